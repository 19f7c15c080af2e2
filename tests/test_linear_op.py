"""The CPU GEMM operator (megatron_sc2/ops/linear.py) against F.linear, and when it is used."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_sc2.errors import ConfigError
from megatron_sc2.ops import linear as lin

needs_onednn = pytest.mark.skipif(not lin.onednn_available(), reason="torch built without oneDNN")


def _grads(fn, x, w, b, g):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


@needs_onednn
@pytest.mark.parametrize("x_shape,out,bias,transposed", [
    ((8, 64, 96), 160, True, False),     # 3-D input, the model's case
    ((37, 96), 8192, False, False),       # lm_head-like: more outputs than rows (the dy^T branch)
    ((512, 1024), 64, True, False),       # fewer outputs than inputs (the x^T branch)
    ((1, 5), 3, True, False),             # one row
    ((96, 40), 24, True, True),           # non-contiguous input
])
def test_forward_and_gradients_equal_f_linear(x_shape, out, bias, transposed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=g)
    if transposed:
        x = torch.randn(x_shape[::-1], generator=g).t()
        assert not x.is_contiguous()
    x.requires_grad_(True)
    w = torch.randn(out, x.shape[-1], generator=g).requires_grad_(True)
    b = torch.randn(out, generator=g).requires_grad_(True) if bias else None
    gy = torch.randn(*x.shape[:-1], out, generator=g)
    ours = _grads(lin.onednn_linear, x, w, b, gy)
    ref = _grads(F.linear, x, w, b, gy)
    for a, r in zip(ours, ref):
        if r is None:
            assert a is None
            continue
        assert a.shape == r.shape
        scale = r.abs().max().clamp_min(1.0)
        assert (a - r).abs().max() / scale < 1e-5


@needs_onednn
def test_operator_registration_and_compile():
    args = (torch.randn(3, 4, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True),
            torch.randn(5, requires_grad=True))
    torch.library.opcheck(lin.onednn_linear, args)
    torch.library.opcheck(lin.onednn_linear, (torch.randn(2, 6), torch.randn(5, 6), None))
    fn = torch.compile(lambda x, w, b: lin.linear(x, w, b).relu(), fullgraph=True)
    x, w, b = (a.detach() for a in args)
    torch.testing.assert_close(fn(x, w, b), lin.linear(x, w, b).relu(), rtol=0, atol=0)


@needs_onednn
def test_deterministic():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(300, 64, generator=g), torch.randn(200, 64, generator=g)
    first = lin.onednn_linear(x, w, None)
    assert all(torch.equal(first, lin.onednn_linear(x, w, None)) for _ in range(3))


@needs_onednn
def test_model_linears_take_the_operator_in_fp32_and_f_linear_under_autocast():
    from megatron_sc2.config import preset
    from megatron_sc2.model import StarCoder2

    cfg = preset("starcoder2-tiny")
    model = StarCoder2(cfg)
    assert isinstance(model.layers["0"].mlp.c_fc, torch.nn.Linear)  # tensor-parallel plans see nn.Linear
    x = torch.randn(2, 5, cfg.hidden_size, requires_grad=True)
    y = model.layers["0"].mlp.c_fc(x)
    assert "megatron_sc2_linear" in type(y.grad_fn).__name__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model.layers["0"].mlp.c_fc(x)
    assert y.dtype == torch.bfloat16 and "megatron_sc2" not in type(y.grad_fn).__name__


def test_backend_switch(monkeypatch):
    monkeypatch.setenv("MEGATRON_SC2_GEMM", "aten")
    assert lin.gemm_backend() == "aten"
    monkeypatch.setenv("MEGATRON_SC2_GEMM", "mkl")
    with pytest.raises(ConfigError, match="MEGATRON_SC2_GEMM"):
        lin.gemm_backend()
    monkeypatch.setattr(lin, "_BACKEND", "aten")
    x, w = torch.randn(2, 3, requires_grad=True), torch.randn(4, 3)
    assert "megatron_sc2" not in type(lin.linear(x, w).grad_fn).__name__
