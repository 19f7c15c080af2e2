"""Calls of the compiled attention modules on raw pointers: what the operators in
megatron_sc2/ops/attention_ops.py run, and what the emulator tests call directly.

The pybind11 modules take data pointers (as integers), sizes and a stream handle, no torch
headers (kernels/build.py says why), so every tensor handed to them here is contiguous and of
the dtype its code names; outputs are allocated here.

Queries may be fewer than keys (q (b, sq, ...), k/v (b, sk, ...), sq <= sk): they are the last sq
positions of the key sequence, doc (b, sk) is given for the keys and lse is (b, h, sq). The C++
and CUDA kernels take the offset themselves (their `Sq` argument; no padding rows).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_sc2.errors import ConfigError


class AttentionInputError(ConfigError, ValueError):
    """Tensors or settings the attention cannot take (the message names which and why)."""


_CPU_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_CUDA_DTYPES = {torch.float16: 0, torch.bfloat16: 1}
_CUDA_HEAD_DIMS = (64, 128)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def cpu_kernel_forward(mod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       doc: Optional[torch.Tensor], window: int, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ kernel's forward: (o like q, lse (batch, heads, sq) fp32, base-2)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, sq, h, d = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    mod.forward(_ptr(q), _ptr(k), _ptr(v), _ptr(o), _ptr(lse), _ptr(doc), b, k.shape[1], h,
                k.shape[2], d, window, scale, _CPU_DTYPES[q.dtype], torch.get_num_threads(),
                **_query_rows(sq, k.shape[1]))
    return o, lse


def _query_rows(sq: int, sk: int) -> dict:
    """The C++ modules' Sq keyword, given only when it differs from the key length (so a module
    built before the offset existed, e.g. one bench/attention.py --vs-build loads, still works
    for sq == sk)."""
    return {} if sq == sk else {"Sq": sq}


def cpu_kernel_backward(mod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, doc: Optional[torch.Tensor], grad_out: torch.Tensor,
                        window: int, scale: float) -> tuple[torch.Tensor, ...]:
    """The matching backward, recomputing the scores from lse: (dq, dk, dv) in q's dtype."""
    q, k, v, o = q.contiguous(), k.contiguous(), v.contiguous(), o.contiguous()
    grad_out = grad_out.to(q.dtype).contiguous()
    b, sq, h, d = q.shape
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    mod.backward(_ptr(q), _ptr(k), _ptr(v), _ptr(o), _ptr(grad_out), _ptr(lse.contiguous()),
                 _ptr(doc), _ptr(dq), _ptr(dk), _ptr(dv), b, k.shape[1], h, k.shape[2], d, window,
                 scale, _CPU_DTYPES[q.dtype], torch.get_num_threads(),
                 **_query_rows(sq, k.shape[1]))
    return dq, dk, dv


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
    backward needs (lo over the key positions). q may hold fewer rows than k (the last
    positions)."""
    b, sq, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    kernel = _family_for_scale(kernel, scale)
    if kernel == 0:
        q, k, v = _aligned16(q), _aligned16(k), _aligned16(v)
    lo, by_id = key_bounds(s, window, doc, b, q.device)
    o = torch.empty_like(q)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    rows = 0 if kernel != 0 else mma_rows_per_warp() if rows_per_warp is None else rows_per_warp
    mod.forward(_ptr(q), _ptr(k), _ptr(v), _ptr(o), _ptr(lse), _ptr(lo), _ptr(doc), _ptr(by_id),
                b, s, h, kvh, d, scale, _CUDA_DTYPES[q.dtype], stream, kernel, rows,
                **_query_rows(sq, s))
    return o, lse, lo, by_id


def cuda_kernel_backward(mod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                         lse: torch.Tensor, doc: Optional[torch.Tensor], lo: torch.Tensor,
                         by_id: Optional[torch.Tensor], grad_out: torch.Tensor, scale: float,
                         kernel: int, stream: int = 0, head_splits: int = 0,
                         bwd_warps: Optional[int] = None) -> tuple[torch.Tensor, ...]:
    """The matching backward: (dq in q's dtype, dk and dv in fp32, accumulated by the kernel).
    Tensor cores (kernel 0) add dQ atomically into a zeroed fp32 scratch, then cast it into dq;
    `head_splits`: their blocks per (key tile, kv head), 0 for the kernel's choice; `bwd_warps`:
    their warps per block, 4 or 8 (None: MEGATRON_SC2_MMA_BWD_WARPS, default 4). q, o,
    grad_out and lse may hold fewer rows than k (the last positions), lo covers the keys."""
    b, sq, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    kernel = _family_for_scale(kernel, scale)
    if kernel == 0:
        q, k, v, grad_out = (_aligned16(t) for t in (q, k, v, grad_out))
    delta = (grad_out.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # (b, h, sq)
    dq = torch.empty_like(q)
    dk32 = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv32 = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    dq32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if kernel == 0 else None
    warps = 0 if kernel != 0 else mma_bwd_warps() if bwd_warps is None else bwd_warps
    mod.backward(_ptr(q), _ptr(k), _ptr(v), _ptr(grad_out), _ptr(lse), _ptr(delta), _ptr(lo),
                 _ptr(doc), _ptr(by_id), _ptr(dq), _ptr(dk32), _ptr(dv32), b, s, h, kvh, d, scale,
                 _CUDA_DTYPES[q.dtype], stream, kernel, _ptr(dq32), head_splits, warps,
                 **_query_rows(sq, s))
    return dq, dk32, dv32
