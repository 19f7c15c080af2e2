"""The attention kernels as PyTorch operators (torch.library), so that torch.compile, FakeTensor
and the meta device see them as ops with a schema instead of opaque Python.

    torch.ops.megatron_sc2.swa_forward(q, k, v, doc, window, scale) -> (o, lse)
    torch.ops.megatron_sc2.swa_backward(q, k, v, o, lse, doc, grad_out, window, scale)
        -> (dq, dk, dv)

q (batch, sq, heads, head_dim), k/v (batch, seq, kv_heads, head_dim) with sq <= seq (the
queries are the last sq positions of the key sequence), one floating dtype the device's kernel
takes (the entry point in attention.py checks and converts); doc int64 (batch, seq) or None, for
the keys; window 0 for plain causal; lse (batch, heads, sq) fp32, the base-2 log-sum-exp the
backward recomputes the scores from. Each op has a CPU kernel (`_attn_cpu`), a
CUDA kernel (`_attn_cuda`, on the current stream), a fake (shape-only) implementation, and the
forward's autograd formula is the backward op, so a compiled graph holds both as single nodes.
Outputs are always fresh contiguous tensors (never views of the inputs).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron_sc2.ops import kernels
from megatron_sc2.ops.kernel_calls import (cpu_kernel_backward, cpu_kernel_forward,
                                           cuda_kernel_backward, cuda_kernel_forward, key_bounds)

NAMESPACE = "megatron_sc2"


def _empty(shape, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype if dtype is None else dtype, device=like.device)


# ---- forward ------------------------------------------------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::swa_forward", mutates_args=(), device_types="cpu")
def swa_forward(q: Tensor, k: Tensor, v: Tensor, doc: Optional[Tensor], window: int,
                scale: float) -> tuple[Tensor, Tensor]:
    """Sliding-window GQA attention forward on the C++ kernel: (o, lse)."""
    return cpu_kernel_forward(kernels.cpu_module(), q, k, v, doc, window, scale)


@swa_forward.register_kernel("cuda")
def _swa_forward_cuda(q: Tensor, k: Tensor, v: Tensor, doc: Optional[Tensor], window: int,
                      scale: float) -> tuple[Tensor, Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        o, lse, _, _ = cuda_kernel_forward(kernels.cuda_module(), q, k, v, doc, window, scale,
                                           kernels.cuda_kernel_code(), stream)
    return o, lse


@swa_forward.register_fake
def _swa_forward_fake(q: Tensor, k: Tensor, v: Tensor, doc: Optional[Tensor], window: int,
                      scale: float) -> tuple[Tensor, Tensor]:
    b, s, h, _ = q.shape
    return _empty(q.shape, q), _empty((b, h, s), q, torch.float32)


# ---- backward -----------------------------------------------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::swa_backward", mutates_args=(), device_types="cpu")
def swa_backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, doc: Optional[Tensor],
                 grad_out: Tensor, window: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of swa_forward's o in q, k and v, recomputing the scores from lse."""
    return cpu_kernel_backward(kernels.cpu_module(), q, k, v, o, lse, doc, grad_out, window, scale)


@swa_backward.register_kernel("cuda")
def _swa_backward_cuda(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                       doc: Optional[Tensor], grad_out: Tensor, window: int,
                       scale: float) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, o = q.contiguous(), k.contiguous(), v.contiguous(), o.contiguous()
    grad_out = grad_out.to(q.dtype).contiguous()
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        # The key bounds are a few (batch, seq) int ops: recomputed rather than saved.
        lo, by_id = key_bounds(k.shape[1], window, doc, q.shape[0], q.device)
        dq, dk32, dv32 = cuda_kernel_backward(kernels.cuda_module(), q, k, v, o, lse.contiguous(),
                                              doc, lo, by_id, grad_out, scale,
                                              kernels.cuda_kernel_code(), stream)
    return dq, dk32.to(k.dtype), dv32.to(v.dtype)


@swa_backward.register_fake
def _swa_backward_fake(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                       doc: Optional[Tensor], grad_out: Tensor, window: int,
                       scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _empty(q.shape, q), _empty(k.shape, k), _empty(v.shape, v)


# ---- autograd -----------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output) -> None:
    q, k, v, doc, window, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, doc)
    ctx.window, ctx.scale = window, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_o: Tensor, grad_lse: Optional[Tensor]):
    q, k, v, o, lse, doc = ctx.saved_tensors
    dq, dk, dv = swa_backward(q, k, v, o, lse, doc, grad_o, ctx.window, ctx.scale)
    return dq, dk, dv, None, None, None


swa_forward.register_autograd(_backward, setup_context=_setup_context)
