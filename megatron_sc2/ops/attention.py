"""Sliding-window grouped-query attention: the one entry point the model calls.

`sliding_window_attention(q, k, v, window=None, softmax_scale=None, document_ids=None)`:
q (batch, seq, heads, head_dim), k/v (batch, seq, kv_heads, head_dim) -> (batch, seq, heads,
head_dim). Query i sees keys i - window < j <= i (window=None: plain causal); with
`document_ids` (batch, seq) it also sees only keys of its own document.

Backends, chosen per call: the CUDA kernel for CUDA tensors (fp16/bf16, head dim 64 or 128), the
C++ kernel for CPU tensors (fp32/bf16), else the PyTorch SDPA reference below (said once in the
log). `MEGATRON_SC2_ATTENTION=reference` forces the reference, e.g. to compare against it.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from megatron_sc2.errors import ConfigError
from megatron_sc2.ops import kernels


class AttentionInputError(ConfigError, ValueError):
    """Tensors or settings the attention cannot take (the message names which and why)."""


def window_mask(seq: int, window: Optional[int], device: torch.device,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask, True where query i may attend key j: i - window < j <= i (and, with
    document_ids, same document). Shape (seq, seq), or (batch, 1, seq, seq) with documents."""
    i = torch.arange(seq, device=device)[:, None]
    j = torch.arange(seq, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (j > i - window)
    if document_ids is not None:
        same = document_ids[:, :, None] == document_ids[:, None, :]
        mask = (mask[None] & same)[:, None]
    return mask


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        window: Optional[int] = None, softmax_scale: Optional[float] = None,
                        document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PyTorch SDPA with an explicit boolean mask: the fallback, and what the kernels must equal."""
    h, kvh = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if window is None and document_ids is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=softmax_scale,
                                             enable_gqa=h != kvh)
    else:
        mask = window_mask(q.shape[1], window, q.device, document_ids)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=softmax_scale,
                                             enable_gqa=h != kvh)
    return out.transpose(1, 2)


# ---- autograd wrappers around the compiled kernels ----------------------------------------------

_CPU_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_CUDA_DTYPES = {torch.float16: 0, torch.bfloat16: 1}
_CUDA_HEAD_DIMS = (64, 128)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class _CpuAttention(torch.autograd.Function):
    """C++ kernel: forward saves the log-sum-exp, backward recomputes the scores from it."""

    @staticmethod
    def forward(ctx, q, k, v, doc, window: int, scale: float):
        mod = kernels.cpu_module()
        b, s, h, d = q.shape
        kvh = k.shape[2]
        o = torch.empty_like(q)
        lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
        mod.forward(_ptr(q), _ptr(k), _ptr(v), _ptr(o), _ptr(lse), _ptr(doc), b, s, h, kvh, d,
                    window, scale, _CPU_DTYPES[q.dtype], torch.get_num_threads())
        ctx.save_for_backward(q, k, v, o, lse, doc)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, o, lse, doc = ctx.saved_tensors
        grad_out = grad_out.to(q.dtype).contiguous()
        b, s, h, d = q.shape
        kvh = k.shape[2]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kernels.cpu_module().backward(
            _ptr(q), _ptr(k), _ptr(v), _ptr(o), _ptr(grad_out), _ptr(lse), _ptr(doc), _ptr(dq),
            _ptr(dk), _ptr(dv), b, s, h, kvh, d, ctx.window, ctx.scale, _CPU_DTYPES[q.dtype],
            torch.get_num_threads())
        return dq, dk, dv, None, None, None


def key_bounds(seq: int, window: int, document_ids: Optional[torch.Tensor], batch: int,
               device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """lo (batch, seq) int32: the first key each query may see (window and, when the ids are
    sorted, the start of its document run); by_id (batch,) uint8: 1 where the ids are not sorted
    and must be compared element by element (None without documents)."""
    pos = torch.arange(seq, device=device, dtype=torch.int64)
    lo = (pos - (window if window > 0 else seq) + 1).clamp_min(0).expand(batch, seq)
    if document_ids is None:
        return lo.to(torch.int32).contiguous(), None
    ids = document_ids
    is_sorted = (ids[:, 1:] >= ids[:, :-1]).all(dim=1)
    change = torch.ones_like(ids, dtype=torch.bool)
    change[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run_start = torch.where(change, pos, torch.zeros_like(pos)).cummax(dim=1).values
    lo = torch.where(is_sorted[:, None], torch.maximum(lo, run_start), lo)
    return lo.to(torch.int32).contiguous(), (~is_sorted).to(torch.uint8).contiguous()


def _mma_knob(name: str, default: str, allowed: tuple[str, ...]) -> int:
    raw = os.environ.get(name, "").strip() or default
    if raw not in allowed:
        raise AttentionInputError(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
    return int(raw)


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """t, or a fresh copy where its data does not start on 16 bytes (a view with an odd storage
    offset): the tensor-core kernels load rows as 16-byte vectors."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _family_for_scale(kernel: int, scale: float) -> int:
    """The tensor-core kernels (0) need a positive softmax scale; SIMT (1) takes any. Their lse
    formats agree, so a forward of one family and a backward of the other combine."""
    return 1 if kernel == 0 and not scale > 0 else kernel


def mma_rows_per_warp() -> int:
    """MEGATRON_SC2_MMA_ROWS_PER_WARP=16|32: query rows per warp of the tensor-core forward (a
    tuning knob: 32 halves its shared-memory reads per mma at the cost of registers)."""
    return _mma_knob("MEGATRON_SC2_MMA_ROWS_PER_WARP", "16", ("16", "32"))


def mma_bwd_warps() -> int:
    """MEGATRON_SC2_MMA_BWD_WARPS=4|8: warps (16 keys each) per block of the tensor-core
    backward (a tuning knob: 8 halves the Q/dO loads and dQ atomics per mma, one block per SM)."""
    return _mma_knob("MEGATRON_SC2_MMA_BWD_WARPS", "4", ("4", "8"))


def cuda_kernel_forward(mod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        doc: Optional[torch.Tensor], window: int, scale: float, kernel: int,
                        stream: int = 0, rows_per_warp: Optional[int] = None
                        ) -> tuple[torch.Tensor, ...]:
    """One call of a CUDA-kernel module's forward: `_attn_cuda` on CUDA tensors, or the emulated
    `_attn_cuda_emu` on CPU tensors (the tests). q/k/v contiguous fp16/bf16, doc int64 or None,
    window 0 for none. `rows_per_warp`: the tensor-core forward's query rows per warp, 16 or 32
    (None: MEGATRON_SC2_MMA_ROWS_PER_WARP, default 16). Returns (o, lse, lo, by_id), what the
    backward needs."""
    b, s, h, d = q.shape
    kvh = k.shape[2]
    kernel = _family_for_scale(kernel, scale)
    if kernel == 0:
        q, k, v = _aligned16(q), _aligned16(k), _aligned16(v)
    lo, by_id = key_bounds(s, window, doc, b, q.device)
    o = torch.empty_like(q)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
    rows = 0 if kernel != 0 else mma_rows_per_warp() if rows_per_warp is None else rows_per_warp
    mod.forward(_ptr(q), _ptr(k), _ptr(v), _ptr(o), _ptr(lse), _ptr(lo), _ptr(doc), _ptr(by_id),
                b, s, h, kvh, d, scale, _CUDA_DTYPES[q.dtype], stream, kernel, rows)
    return o, lse, lo, by_id


def cuda_kernel_backward(mod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                         lse: torch.Tensor, doc: Optional[torch.Tensor], lo: torch.Tensor,
                         by_id: Optional[torch.Tensor], grad_out: torch.Tensor, scale: float,
                         kernel: int, stream: int = 0, head_splits: int = 0,
                         bwd_warps: Optional[int] = None) -> tuple[torch.Tensor, ...]:
    """The matching backward: (dq in q's dtype, dk and dv in fp32, accumulated by the kernel).
    Tensor cores (kernel 0) add dQ atomically into a zeroed fp32 scratch, then cast it into dq;
    `head_splits`: their blocks per (key tile, kv head), 0 for the kernel's choice; `bwd_warps`:
    their warps per block, 4 or 8 (None: MEGATRON_SC2_MMA_BWD_WARPS, default 4)."""
    b, s, h, d = q.shape
    kvh = k.shape[2]
    kernel = _family_for_scale(kernel, scale)
    if kernel == 0:
        q, k, v, grad_out = (_aligned16(t) for t in (q, k, v, grad_out))
    delta = (grad_out.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # (b, h, s)
    dq = torch.empty_like(q)
    dk32 = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv32 = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    dq32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if kernel == 0 else None
    warps = 0 if kernel != 0 else mma_bwd_warps() if bwd_warps is None else bwd_warps
    mod.backward(_ptr(q), _ptr(k), _ptr(v), _ptr(grad_out), _ptr(lse), _ptr(delta), _ptr(lo),
                 _ptr(doc), _ptr(by_id), _ptr(dq), _ptr(dk32), _ptr(dv32), b, s, h, kvh, d, scale,
                 _CUDA_DTYPES[q.dtype], stream, kernel, _ptr(dq32), head_splits, warps)
    return dq, dk32, dv32


class _CudaAttention(torch.autograd.Function):
    """CUDA kernel on the current stream; dK/dV are accumulated in fp32, then cast."""

    @staticmethod
    def forward(ctx, q, k, v, doc, window: int, scale: float):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        with torch.cuda.device(q.device):
            o, lse, lo, by_id = cuda_kernel_forward(kernels.cuda_module(), q, k, v, doc, window,
                                                    scale, kernels.cuda_kernel_code(), stream)
        ctx.save_for_backward(q, k, v, o, lse, doc, lo, by_id)
        ctx.scale = scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, o, lse, doc, lo, by_id = ctx.saved_tensors
        grad_out = grad_out.to(q.dtype).contiguous()
        stream = torch.cuda.current_stream(q.device).cuda_stream
        with torch.cuda.device(q.device):
            dq, dk32, dv32 = cuda_kernel_backward(
                kernels.cuda_module(), q, k, v, o, lse, doc, lo, by_id, grad_out, ctx.scale,
                kernels.cuda_kernel_code(), stream)
        return dq, dk32.to(k.dtype), dv32.to(v.dtype), None, None, None


# ---- the entry point ----------------------------------------------------------------------------

def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int],
           softmax_scale: Optional[float], document_ids: Optional[torch.Tensor]) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise AttentionInputError(f"attention: {name} must be a 4-d tensor "
                                      f"(batch, seq, heads, head_dim), got {shape}")
        if not t.is_floating_point():
            raise AttentionInputError(f"attention: {name} must be floating point, got {t.dtype}")
        if t.device != q.device:
            raise AttentionInputError(f"attention: {name} is on {t.device}, q on {q.device}")
    b, s, h, d = q.shape
    if k.shape != v.shape:
        raise AttentionInputError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, s, d):
        raise AttentionInputError(f"attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} "
                                  "in batch, seq or head_dim")
    kvh = k.shape[2]
    if kvh == 0 or h % kvh:
        raise AttentionInputError(f"attention: query heads ({h}) must be a multiple of kv heads "
                                  f"({kvh})")
    if min(b, s, d) == 0 or h == 0:
        raise AttentionInputError(f"attention: empty input q {tuple(q.shape)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise AttentionInputError(f"attention: sliding window must be a positive int or None, "
                                  f"got {window!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float))
                                          and math.isfinite(softmax_scale)):
        raise AttentionInputError(f"attention: softmax_scale must be a finite number, "
                                  f"got {softmax_scale!r}")
    if document_ids is not None:
        if not isinstance(document_ids, torch.Tensor) or tuple(document_ids.shape) != (b, s):
            shape = tuple(document_ids.shape) if isinstance(document_ids, torch.Tensor) else None
            raise AttentionInputError(f"attention: document_ids must have shape (batch, seq) = "
                                      f"{(b, s)}, got {shape}")
        if document_ids.is_floating_point() or document_ids.is_complex():
            raise AttentionInputError(f"attention: document_ids must be integers, "
                                      f"got {document_ids.dtype}")
        if document_ids.device != q.device:
            raise AttentionInputError(f"attention: document_ids on {document_ids.device}, "
                                      f"q on {q.device}")


def attention_backend(q: torch.Tensor, head_dim: Optional[int] = None) -> str:
    """Which implementation a call with q like this one uses: 'cuda', 'cpu' or 'reference'."""
    if os.environ.get("MEGATRON_SC2_ATTENTION", "auto") == "reference":
        return "reference"
    d = q.shape[-1] if head_dim is None else head_dim
    if q.device.type == "cuda":
        mod = kernels.cuda_module()
        if mod is None:
            kernels.warn_once("cuda-missing", "attention: the CUDA kernel module is not built "
                              f"({kernels.load_error('_attn_cuda')}); using the PyTorch reference")
            return "reference"
        if q.dtype not in _CUDA_DTYPES or d not in _CUDA_HEAD_DIMS:
            kernels.warn_once(f"cuda-{q.dtype}-{d}", f"attention: no CUDA kernel for {q.dtype} "
                              f"with head dim {d}; using the PyTorch reference")
            return "reference"
        return "cuda"
    if q.device.type == "cpu":
        mod = kernels.cpu_module()
        if mod is None:
            kernels.warn_once("cpu-missing", "attention: the C++ kernel module is not built "
                              f"({kernels.load_error('_attn_cpu')}); using the PyTorch reference")
            return "reference"
        if q.dtype not in _CPU_DTYPES:
            kernels.warn_once(f"cpu-{q.dtype}", f"attention: no C++ kernel for {q.dtype}; "
                              "using the PyTorch reference")
            return "reference"
        return "cpu"
    kernels.warn_once(f"dev-{q.device.type}", f"attention: no kernel for device {q.device.type}; "
                      "using the PyTorch reference")
    return "reference"


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             window: Optional[int] = None, softmax_scale: Optional[float] = None,
                             document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal (optionally sliding-window, optionally per-document) GQA attention; see the module
    docstring. Accepts non-contiguous views and mixed dtypes; differentiable in q, k and v."""
    _check(q, k, v, window, softmax_scale, document_ids)
    # Under autocast, compute in its lower precision (as SDPA does); else in the common dtype.
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    backend = attention_backend(q)
    if backend == "reference":
        return reference_attention(q, k, v, window, softmax_scale, document_ids)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    doc = None if document_ids is None else document_ids.to(torch.int64).contiguous()
    win = 0 if window is None or window >= q.shape[1] else int(window)
    fn = _CudaAttention if backend == "cuda" else _CpuAttention
    with torch.autocast(q.device.type, enabled=False):
        return fn.apply(q.contiguous(), k.contiguous(), v.contiguous(), doc, win, scale)
