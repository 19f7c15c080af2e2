"""The attention kernels as torch.library operators: torch's own operator checks (schema, fake
tensors, autograd registration, AOT dispatch), the meta device, and torch.compile of the whole
model with fullgraph=True giving the uncompiled logits and gradients.

Compilation is slow on the shared 2-core machine: one tiny model is compiled once for the module.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from megatron_sc2.config import preset
from megatron_sc2.model import StarCoder2
from megatron_sc2.ops import attention_ops, kernels
from megatron_sc2.ops.attention import reference_attention

pytestmark = pytest.mark.skipif(kernels.cpu_module() is None,
                                reason="the C++ kernel module is not built")

FWD = torch.ops.megatron_sc2.swa_forward.default
BWD = torch.ops.megatron_sc2.swa_backward.default


def _inputs(b=2, s=20, h=4, kvh=2, d=16, dtype=torch.float32, grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, n, d, generator=gen, dtype=torch.float32).to(dtype)
            .requires_grad_(grad) for n in (h, kvh, kvh)]


def _docs(b=2, s=20):
    return torch.tensor([[0] * 7 + [1] * 13, [0] * 3 + [1] * 9 + [2] * 8], dtype=torch.int64)[:b, :s]


@pytest.mark.parametrize("window,with_docs", [(0, False), (5, False), (6, True)])
def test_forward_op_passes_torch_opcheck(window, with_docs):
    q, k, v = _inputs()
    doc = _docs() if with_docs else None
    torch.library.opcheck(FWD, (q, k, v, doc, window, 0.25))


def test_backward_op_passes_torch_opcheck():
    q, k, v = _inputs(grad=False)
    o, lse = FWD(q, k, v, None, 5, 0.25)
    grad_out = torch.randn_like(o)
    torch.library.opcheck(BWD, (q, k, v, o, lse, _docs(), grad_out, 5, 0.25))


@pytest.mark.parametrize("window,with_docs", [(0, False), (4, True)])
def test_offset_ops_pass_torch_opcheck(window, with_docs):
    # Fewer queries (the last 7 positions) than keys (20): lse is (b, h, 7), dk/dv like k.
    q, k, v = _inputs()
    q = q.detach()[:, 13:].clone().requires_grad_()
    doc = _docs() if with_docs else None
    torch.library.opcheck(FWD, (q, k, v, doc, window, 0.25))
    o, lse = FWD(q.detach(), k.detach(), v.detach(), doc, window, 0.25)
    assert o.shape == q.shape and lse.shape == (2, 4, 7)
    torch.library.opcheck(BWD, (q.detach(), k.detach(), v.detach(), o, lse, doc,
                                torch.randn_like(o), window, 0.25))


def test_offset_op_gradients_equal_the_sdpa_reference():
    ours = _inputs(seed=5)
    ours[0] = ours[0].detach()[:, 9:].clone().requires_grad_()
    theirs = [t.detach().double().requires_grad_() for t in ours]
    o, _ = attention_ops.swa_forward(*ours, _docs(), 6, 0.3)
    ref = reference_attention(*theirs, window=6, softmax_scale=0.3, document_ids=_docs())
    dout = torch.randn(o.shape, generator=torch.Generator().manual_seed(6))
    (o * dout).sum().backward()
    (ref * dout.double()).sum().backward()
    for a, b in [(o, ref)] + [(x.grad, y.grad) for x, y in zip(ours, theirs)]:
        assert a.shape == b.shape
        assert (a.double() - b).abs().max() / b.abs().max() <= 1e-5


def test_op_gradients_equal_the_sdpa_reference():
    # Through the registered autograd formula (the backward op), in fp32 and bf16.
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        ours = _inputs(dtype=dtype, seed=3)
        theirs = [t.detach().double().requires_grad_() for t in ours]
        o, _ = attention_ops.swa_forward(*ours, _docs(), 6, 0.3)
        ref = reference_attention(*theirs, window=6, softmax_scale=0.3, document_ids=_docs())
        dout = torch.randn(o.shape, generator=torch.Generator().manual_seed(4))
        (o.float() * dout).sum().backward()
        (ref * dout.double()).sum().backward()
        assert o.dtype == dtype
        for a, b in [(o, ref)] + [(x.grad, y.grad) for x, y in zip(ours, theirs)]:
            err = (a.double() - b).abs().max() / b.abs().max()
            assert err <= tol, (dtype, float(err))


def test_ops_run_on_meta_and_fake_tensors():
    q, k, v = (t.detach().to("meta") for t in _inputs(b=3, s=11, h=6, kvh=3, d=8, grad=False))
    o, lse = FWD(q, k, v, None, 4, 0.5)
    assert o.device.type == "meta" and o.shape == q.shape and o.dtype == q.dtype
    assert lse.shape == (3, 6, 11) and lse.dtype == torch.float32
    dq, dk, dv = BWD(q, k, v, o, lse, None, o, 4, 0.5)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    with FakeTensorMode():
        fq, fk, fv = (torch.empty(2, 9, n, 8, dtype=torch.bfloat16) for n in (4, 1, 1))
        fo, flse = FWD(fq, fk, fv, torch.zeros(2, 9, dtype=torch.int64), 3, 0.1)
        assert fo.shape == fq.shape and fo.dtype == torch.bfloat16 and flse.shape == (2, 4, 9)
        fo, flse = FWD(fq[:, 5:], fk, fv, None, 3, 0.1)  # fewer queries than keys
        assert fo.shape == (2, 4, 4, 8) and flse.shape == (2, 4, 4)
        fdq, fdk, _ = BWD(fq[:, 5:], fk, fv, fo, flse, None, fo, 3, 0.1)
        assert fdq.shape == (2, 4, 4, 8) and fdk.shape == fk.shape
    # A whole model on the meta device runs its forward through the fake implementation.
    with torch.device("meta"):
        model = StarCoder2(preset("starcoder2-tiny"))
    logits = model(torch.zeros(2, 12, dtype=torch.int64, device="meta"))
    assert logits.shape == (2, 12, model.cfg.vocab_size) and logits.device.type == "meta"


def test_cuda_kernels_are_registered_for_both_ops():
    # They cannot run here (no GPU); tests/test_attention_cuda.py runs them where one is.
    for name in ("megatron_sc2::swa_forward", "megatron_sc2::swa_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name


class _GraphRecorder:
    """A torch.compile backend that records each Dynamo graph's targets, then hands the graph
    to Inductor (the default backend)."""

    def __init__(self):
        self.graphs: list[list[str]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return compile_fx(gm, example_inputs)


@pytest.fixture(scope="module")
def compiled_run():
    """One tiny model (window smaller than the sequence, packed documents), run eagerly and
    compiled with fullgraph=True: logits and gradients of both."""
    cfg = dataclasses.replace(preset("starcoder2-tiny"), sliding_window=8)
    torch.manual_seed(0)
    model = StarCoder2(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])

    def run(fn):
        model.zero_grad(set_to_none=True)
        logits = fn(tokens, document_ids=docs)
        logits.float().logsumexp(-1).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager = run(model)
    recorder = _GraphRecorder()
    compiled = run(torch.compile(model, fullgraph=True, backend=recorder))
    return eager, compiled, recorder.graphs, cfg


def test_compiled_model_equals_uncompiled_logits_and_gradients(compiled_run):
    (logits, grads), (c_logits, c_grads), _, _ = compiled_run
    scale = logits.abs().max()
    assert (c_logits - logits).abs().max() <= 1e-5 * scale
    assert grads.keys() == c_grads.keys()
    for name, g in grads.items():
        assert (c_grads[name] - g).abs().max() <= 1e-5 * max(g.abs().max(), 1e-6), name


def test_compiled_model_is_one_graph_with_our_attention_op(compiled_run):
    # fullgraph=True already raises on any graph break; the one graph holds our op per layer.
    _, _, graphs, cfg = compiled_run
    assert len(graphs) == 1
    assert graphs[0].count("megatron_sc2.swa_forward.default") == cfg.num_layers
