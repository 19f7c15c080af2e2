"""Model FLOPs of a StarCoder2 training step and the peak they are measured against (MFU).

Counted from the shapes, as Megatron's MFU does: every matmul is 2 x m x n x k FLOPs, the
backward pass costs twice the forward, activation recomputation is not counted (it is
hardware work, not model work). Attention scores and the weighted sum cover only the keys a
query actually sees: with a sliding window w, query i sees min(i + 1, w) keys.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from megatron_sc2.config import ModelConfig
from megatron_sc2.ops.linear import linear

# Dense bf16 tensor-core peaks (TFLOP/s) of common training GPUs, from their data sheets.
_GPU_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0,
                         "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def attended_keys(seq_length: int, window: Optional[int]) -> int:
    """Sum over query positions of the number of keys each attends (causal, windowed)."""
    s = seq_length
    if window is None or window >= s:
        return s * (s + 1) // 2
    w = window
    return w * (w + 1) // 2 + (s - w) * w


def forward_flops_per_sequence(cfg: ModelConfig, seq_length: int) -> int:
    h, f, v, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.head_dim
    kv = cfg.num_query_groups * d
    s = seq_length
    proj = 2 * s * (h * h + 2 * h * kv + h * h)          # q, k, v, o
    mlp = 2 * s * (2 * h * f)                              # c_fc, c_proj
    attn = 2 * 2 * attended_keys(s, cfg.sliding_window) * cfg.num_attention_heads * d  # QK^T, AV
    logits = 2 * s * h * v
    return cfg.num_layers * (proj + mlp + attn) + logits


def train_flops_per_step(cfg: ModelConfig, seq_length: int, global_batch_size: int) -> int:
    """Model FLOPs of one optimizer step (forward + backward = 3 x forward)."""
    return 3 * forward_flops_per_sequence(cfg, seq_length) * global_batch_size


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was found). GPUs: the data-sheet dense bf16 peak of a
    known model, else a measured matmul peak; CPUs: a measured fp32 matmul peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _GPU_PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} data sheet (bf16 dense)"
        return measure_matmul_flops(device, dtype), f"{name} measured bf16 matmul"
    return measure_matmul_flops(device, torch.float32), "measured fp32 matmul (CPU)"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024,
                         seconds: float = 0.3) -> float:
    """Best-of FLOP/s of an n x n matmul on this device with the current thread count, on the
    fastest product available: torch's matmul and the model's own linear op (on the CPU it
    runs on oneDNN, which can outrun torch's BLAS by 2x: megatron_sc2/ops/linear.py)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for product in (torch.matmul, linear):
        product(a, b)  # warm up
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            product(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            best = max(best, 2 * n ** 3 / dt)
    return best


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: allocator peak on CUDA, max resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
