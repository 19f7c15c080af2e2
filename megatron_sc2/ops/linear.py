"""The model's linear layers on the faster CPU GEMM: oneDNN instead of the BLAS behind F.linear.

PyTorch's CPU wheels run fp32 `F.linear`/`mm` on MKL's sgemm. On AMD CPUs MKL picks its AVX2
code even where the CPU has AVX-512, while oneDNN (also inside every CPU wheel) uses the widest
vectors the CPU has: on the 2-core Zen 5 sandbox oneDNN's fp32 products are 1.6-2.1x faster at
the model's shapes (bench/gemm.py). So on the CPU, in fp32, the three products of a linear layer
(y = x W^T + b, dx = dy W, dW = dy^T x) go to oneDNN through two operators:

    torch.ops.megatron_sc2.linear(x, weight, bias) -> y
    torch.ops.megatron_sc2.linear_backward(grad_y, x, weight, with_bias) -> (dx, dW, db)

each with a fake (shape-only) implementation and the backward registered as the forward's
gradient, so torch.compile and FakeTensor see single nodes. Everything else — CUDA, bf16 or
autocast, tensor subclasses such as tensor parallelism's DTensor, builds without oneDNN, or
`MEGATRON_SC2_GEMM=aten` — takes `F.linear`. Results agree with F.linear to fp32 rounding
(~1e-7 relative), not bit for bit: the two libraries sum in different orders.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_sc2.errors import ConfigError

NAMESPACE = "megatron_sc2"
_PLAIN = (Tensor, nn.Parameter)


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear operator."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def gemm_backend() -> str:
    """'onednn' or 'aten' (F.linear): MEGATRON_SC2_GEMM=onednn|aten|auto, auto by default."""
    choice = os.environ.get("MEGATRON_SC2_GEMM", "auto")
    if choice not in ("auto", "onednn", "aten"):
        raise ConfigError(f"MEGATRON_SC2_GEMM must be auto, onednn or aten, got {choice!r}")
    if choice == "aten":
        return "aten"
    return "onednn" if onednn_available() else "aten"


def _initial_backend() -> Optional[str]:
    try:
        return gemm_backend()
    except ConfigError:  # raised, as one line, by the first linear call instead of at import
        return None


_BACKEND: Optional[str] = _initial_backend()


def _product(a: Tensor, b: Tensor, bias: Optional[Tensor]) -> Tensor:
    """a @ b^T (+ bias) for 2-D a (m, k) and b (n, k) on oneDNN. oneDNN reads a transposed b in
    place but copies a non-contiguous a, so callers hand it a contiguous a."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


@torch.library.custom_op(f"{NAMESPACE}::linear", mutates_args=(), device_types="cpu")
def onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y = x W^T + b for x (..., in), weight (out, in), on oneDNN."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return _product(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])


@onednn_linear.register_fake
def _linear_fake(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op(f"{NAMESPACE}::linear_backward", mutates_args=(), device_types="cpu")
def onednn_linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor,
                           with_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, db) of onednn_linear; db is empty when there is no bias."""
    out_f, in_f = weight.shape
    dy = grad_y.reshape(-1, out_f).contiguous()
    flat = x.reshape(-1, in_f).contiguous()
    dx = _product(dy, weight.t(), None).view(x.shape)           # dy W
    # dW = dy^T x needs one operand transposed into a contiguous copy: dy^T, or else x^T and
    # then the product dW^T = x^T dy transposed back; whichever copies fewer elements.
    if dy.numel() <= flat.numel() + weight.numel():
        dw = _product(dy.t().contiguous(), flat.t(), None)
    else:
        dw = _product(flat.t().contiguous(), dy.t(), None).t().contiguous()
    db = dy.sum(0) if with_bias else dy.new_empty(0)
    return dx, dw, db


@onednn_linear_backward.register_fake
def _linear_backward_fake(grad_y: Tensor, x: Tensor, weight: Tensor,
                          with_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],) if with_bias else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.with_bias = bias is not None


def _backward(ctx, grad_y: Tensor):
    x, weight = ctx.saved_tensors
    dx, dw, db = onednn_linear_backward(grad_y, x, weight, ctx.with_bias)
    return dx, dw, (db if ctx.with_bias else None)


onednn_linear.register_autograd(_backward, setup_context=_setup_context)


def _takes_onednn(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = gemm_backend()
    return (_BACKEND == "onednn" and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and type(x) in _PLAIN and type(weight) in _PLAIN
            and (bias is None or (type(bias) in _PLAIN and bias.dtype == torch.float32))
            and x.numel() > 0 and not torch.is_autocast_enabled("cpu"))


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear, on oneDNN where that is faster (see the module docstring)."""
    if _takes_onednn(x, weight, bias):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict, same type for tensor-parallel plans) whose
    product goes through `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
