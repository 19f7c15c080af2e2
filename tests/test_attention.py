"""Our sliding-window GQA attention (C++ CPU kernel) against float64 PyTorch SDPA.

The oracle is torch's own scaled_dot_product_attention in float64 with a boolean mask built here
from the definition (query i sees keys i - w < j <= i of its own document); gradients come from
torch autograd through it.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from megatron_sc2.errors import UserError
from megatron_sc2.ops import attention as attn
from megatron_sc2.ops import kernels
from megatron_sc2.ops.attention import (AttentionInputError, attention_backend, key_bounds,
                                        sliding_window_attention)


def oracle_mask(seq: int, window: Optional[int], docs: Optional[torch.Tensor],
                queries: Optional[int] = None) -> torch.Tensor:
    """True where query row t (position i = t + seq - queries: the queries are the last
    positions) may see key j; docs (batch, seq) are the keys' ids."""
    nq = seq if queries is None else queries
    i = torch.arange(seq - nq, seq)[:, None]
    j = torch.arange(seq)[None, :]
    ok = (j <= i) & ((j > i - window) if window is not None else True)
    ok = ok.expand(1 if docs is None else docs.shape[0], nq, seq)
    if docs is not None:
        ok = ok & (docs[:, seq - nq:, None] == docs[:, None, :])
    return ok[:, None]  # (batch, 1, queries, seq)


def oracle(q, k, v, window, docs, scale=None):
    """float64 SDPA (math backend) with the mask above; q (b, sq, h, d), k/v (b, s, kv, d)."""
    mask = oracle_mask(k.shape[1], window, docs, q.shape[1])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def make_docs(kind: Optional[str], b: int, s: int, gen: torch.Generator) -> Optional[torch.Tensor]:
    if kind is None:
        return None
    if kind == "sorted":  # packed samples: runs of increasing ids, some of length 1
        cuts = torch.rand(b, s, generator=gen) < 0.08
        cuts[:, 0] = False
        return cuts.long().cumsum(1) + 7
    return torch.randint(0, 3, (b, s), generator=gen)  # ids repeating in separate runs


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|; absolute when ref is zero in exact arithmetic (window 1)."""
    err = (got.double() - ref).abs().max().item()
    if err != err:  # NaN: inf instead, which max() and <= cannot overlook
        return float("inf")
    scale = ref.abs().max().item()
    return err if scale < 1e-6 else err / scale


# (batch, seq, heads, kv_heads, head_dim, window, documents): seq never a multiple of the 64-row
# tiles except 128; windows < seq, == seq, > seq, None and 1; GQA groups 1, 2, 3, 4, 6, 8.
FIXED_CASES = [
    (1, 1, 1, 1, 16, None, None),
    (2, 100, 4, 2, 16, 16, None),
    (1, 130, 6, 2, 32, None, None),
    (2, 77, 4, 1, 40, 1, "sorted"),
    (1, 200, 6, 3, 128, 64, "sorted"),
    (3, 65, 3, 3, 24, 65, "unsorted"),
    (1, 129, 8, 1, 64, 300, None),
    (2, 150, 12, 2, 16, 37, "unsorted"),
    (1, 128, 2, 1, 16, 1, None),
    (2, 190, 4, 2, 8, 70, "sorted"),
]


def _random_cases(n: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kv = rng.choice([1, 2, 3])
        s = rng.randint(2, 260)
        out.append((rng.randint(1, 3), s, kv * rng.choice([1, 2, 4]), kv, rng.choice([8, 16, 48, 64]),
                    rng.choice([None, 1, rng.randint(1, s), s + rng.randint(0, 50)]),
                    rng.choice([None, "sorted", "unsorted"])))
    return out


CASES = FIXED_CASES + _random_cases(8, seed=2024)


@pytest.fixture(params=["avx512", "avx2", "baseline"])
def isa(request):
    """Runs a test with each instruction-set build of the C++ kernel this CPU can run."""
    mod = kernels.cpu_module()
    assert mod is not None, f"C++ attention module not built: {kernels.load_error('_attn_cpu')}"
    if request.param not in mod.available_isas():
        pytest.skip(f"this CPU cannot run the {request.param} build")
    before = mod.isa()
    mod.set_isa(request.param)
    yield request.param
    mod.set_isa(before)


def test_widest_isa_is_the_default_and_unknown_ones_are_refused():
    # The module starts on the widest build the CPU runs (AVX-512 before AVX2 before baseline);
    # set_isa refuses names it does not have, so a CPU without AVX-512 falls back cleanly.
    mod = kernels.cpu_module()
    isas = mod.available_isas()
    assert isas[0] == "baseline" and set(isas) <= {"baseline", "avx2", "avx512"}
    assert isas == [i for i in ("baseline", "avx2", "avx512") if i in isas]
    flags = open("/proc/cpuinfo").read().split() if Path("/proc/cpuinfo").exists() else []
    if flags:  # what the kernel chose agrees with what the CPU reports
        assert ("avx512" in isas) == all(f in flags for f in
                                         ("avx512f", "avx512bw", "avx512vl", "avx512dq"))
        assert ("avx2" in isas) == all(f in flags for f in ("avx2", "fma"))
    before = mod.isa()
    try:
        mod.set_isa(isas[0])
        assert mod.isa() == isas[0]
        with pytest.raises(ValueError, match="not available"):
            mod.set_isa("avx1024")
        assert mod.isa() == isas[0]
    finally:
        mod.set_isa(before)
    import subprocess
    import sys
    # A fresh process (the module alone, no torch) starts on the widest one.
    load = ("import importlib.util as u, sys; s = u.spec_from_file_location('_attn_cpu', "
            "sys.argv[1]); m = u.module_from_spec(s); s.loader.exec_module(m); print(m.isa())")
    fresh = subprocess.run([sys.executable, "-c", load, mod.__file__], capture_output=True,
                           text=True, check=True)
    assert fresh.stdout.strip() == isas[-1]


def _check_case(case, dtype, tol, seed, queries: Optional[int] = None):
    """One case against the oracle; `queries` < seq: only the last that many positions query."""
    b, s, h, kvh, d, window, doc_kind = case
    sq = s if queries is None else queries
    gen = torch.Generator().manual_seed(seed)
    q, k, v, go = (torch.randn(shape, generator=gen).to(dtype) for shape in
                   ((b, sq, h, d), (b, s, kvh, d), (b, s, kvh, d), (b, sq, h, d)))
    docs = make_docs(doc_kind, b, s, gen)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = oracle(*ref_in, window, docs)
    ref.backward(go.double())
    ours_in = [t.clone().requires_grad_() for t in (q, k, v)]
    assert attention_backend(ours_in[0]) == "cpu"
    out = sliding_window_attention(*ours_in, window=window, document_ids=docs)
    out.backward(go)
    assert out.dtype == dtype and out.shape == (b, sq, h, d)
    errs = {"out": rel_err(out, ref)}
    for name, a, r in zip("qkv", ours_in, ref_in):
        assert a.grad.dtype == dtype
        errs[f"d{name}"] = rel_err(a.grad, r.grad)
    assert max(errs.values()) <= tol, (case, errs)


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_fp32_matches_float64(case, isa):
    _check_case(case, torch.float32, 1e-5, seed=CASES.index(case))


@pytest.mark.parametrize("case", CASES[:8], ids=[str(c) for c in CASES[:8]])
def test_bf16_matches_float64(case, isa):
    # Inputs rounded to bf16 on both sides; our outputs and gradients are bf16 (fp32 inside).
    _check_case(case, torch.bfloat16, 1e-2, seed=7)


# Training-like lengths: many full 64x64 tiles between the two half-masked edge tiles of each
# query tile, GQA groups of 4 sharing each packed K/V tile, windows on and off the tile grid.
LONG_CASES = [
    (1, 1100, 8, 2, 32, 256, None),
    (1, 777, 8, 2, 32, 200, "sorted"),
    (2, 600, 4, 1, 48, 130, "unsorted"),
]


@pytest.mark.parametrize("case", LONG_CASES, ids=[str(c) for c in LONG_CASES])
def test_long_sequences_match_float64(case, isa):
    _check_case(case, torch.float32, 1e-5, seed=100 + LONG_CASES.index(case))


# Fewer queries than keys (a context-parallel chunk after its halo): (case, queries). Windows
# below and above the query count, offsets on and off the 64-row tile grid, one query, all.
OFFSET_CASES = [
    ((1, 100, 4, 2, 16, 20, None), 37),
    ((2, 150, 4, 2, 32, 64, None), 1),
    ((1, 200, 8, 2, 32, 130, "sorted"), 64),
    ((2, 190, 6, 3, 24, 30, "sorted"), 100),
    ((1, 260, 4, 1, 48, 80, "unsorted"), 129),
    ((2, 77, 4, 2, 16, None, "unsorted"), 50),
    ((1, 300, 8, 2, 64, 400, None), 70),
    ((1, 90, 2, 1, 8, 1, "sorted"), 45),
    ((2, 120, 4, 2, 16, 33, "sorted"), 120),
    ((1, 1023, 4, 1, 16, 512, None), 512),  # CP4 rank 3's shape (L = w, w - 1 halo), scaled
]
OFFSET_IDS = [f"{c}-q{n}" for c, n in OFFSET_CASES]


@pytest.mark.parametrize("case,queries", OFFSET_CASES, ids=OFFSET_IDS)
def test_offset_queries_fp32_match_float64(case, queries, isa):
    _check_case(case, torch.float32, 1e-5, seed=300 + OFFSET_CASES.index((case, queries)),
                queries=queries)


@pytest.mark.parametrize("case,queries", OFFSET_CASES[:-1], ids=OFFSET_IDS[:-1])
def test_offset_queries_bf16_match_float64(case, queries, isa):
    _check_case(case, torch.bfloat16, 1e-2, seed=400, queries=queries)


def test_offset_queries_equal_the_last_rows_of_the_full_call():
    # The offset call is the full call's last rows (outputs and dq), and its dk/dv are the full
    # call's when only those rows carry gradient: against our own kernel, tighter than float64.
    gen = torch.Generator().manual_seed(31)
    b, s, sq, w = 2, 333, 140, 90
    q, k, v = (torch.randn(b, s, n, 32, generator=gen) for n in (6, 2, 2))
    docs = make_docs("sorted", b, s, gen)
    go = torch.randn(b, s, 6, 32, generator=gen)
    go[:, :s - sq] = 0
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out_full = sliding_window_attention(*full, window=w, document_ids=docs)
    out_full.backward(go)
    part = [q[:, s - sq:].clone().requires_grad_(), k.clone().requires_grad_(),
            v.clone().requires_grad_()]
    out = sliding_window_attention(*part, window=w, document_ids=docs)
    out.backward(go[:, s - sq:])
    assert rel_err(out, out_full[:, s - sq:].double()) <= 1e-6
    assert rel_err(part[0].grad, full[0].grad[:, s - sq:].double()) <= 1e-6
    for a, r in zip(part[1:], full[1:]):
        assert rel_err(a.grad, r.grad.double()) <= 1e-6


def test_offset_keys_outside_the_chunks_window_are_never_read():
    # Keys before the window of the first query are NaN: the offset call must not touch them.
    b, s, sq, w = 1, 500, 100, 64
    gen = torch.Generator().manual_seed(37)
    q = torch.randn(b, sq, 4, 16, generator=gen)
    k, v = (torch.randn(b, s, 2, 16, generator=gen) for _ in range(2))
    first = s - sq - w + 1  # the first key query row 0 sees
    k[:, :first] = float("nan")
    v[:, :first] = float("nan")
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sliding_window_attention(*xs, window=w)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(xs[0].grad).all()
    assert all(torch.isfinite(x.grad[:, first:]).all() for x in xs[1:])
    ref = oracle(q.double(), k[:, first:].double(), v[:, first:].double(), w, None)
    assert rel_err(out, ref) <= 1e-5


def test_offset_reference_path_matches_the_kernel(monkeypatch):
    # The SDPA fallback takes the same offset (its explicit mask; SDPA's is_causal would align
    # the queries with the first keys instead).
    gen = torch.Generator().manual_seed(41)
    q = torch.randn(2, 30, 4, 16, generator=gen)
    k, v = (torch.randn(2, 75, 2, 16, generator=gen) for _ in range(2))
    docs = make_docs("unsorted", 2, 75, gen)
    for window, ids in ((None, None), (12, None), (None, docs), (50, docs)):
        fast = sliding_window_attention(q, k, v, window=window, document_ids=ids)
        monkeypatch.setenv("MEGATRON_SC2_ATTENTION", "reference")
        slow = sliding_window_attention(q, k, v, window=window, document_ids=ids)
        monkeypatch.delenv("MEGATRON_SC2_ATTENTION")
        ref = oracle(q.double(), k.double(), v.double(), window, ids)
        assert rel_err(slow, ref) <= 1e-5 and rel_err(fast, ref) <= 1e-5, (window, ids is None)


def test_offset_sizes_are_checked_by_the_module():
    # The pybind11 module itself refuses Sq > S (a caller bypassing the Python checks).
    mod = kernels.cpu_module()
    q = torch.zeros(1, 5, 1, 8)
    k = torch.zeros(1, 4, 1, 8)
    o, lse = torch.empty_like(q), torch.empty(1, 1, 5)
    with pytest.raises(ValueError, match="Sq <= S"):
        mod.forward(q.data_ptr(), k.data_ptr(), k.data_ptr(), o.data_ptr(), lse.data_ptr(), 0,
                    1, 4, 1, 1, 8, 0, 1.0, 0, 1, Sq=5)


def test_softmax_scale_and_window_matter():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 90, 4, 32, generator=gen) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    ours = sliding_window_attention(q, k, v, window=20, softmax_scale=0.3)
    ref = oracle(q.double(), k.double(), v.double(), 20, None, scale=0.3)
    assert rel_err(ours, ref) <= 1e-5
    assert (ours - sliding_window_attention(q, k, v, window=20)).abs().max() > 1e-3
    assert (ours - sliding_window_attention(q, k, v, softmax_scale=0.3)).abs().max() > 1e-3


def test_keys_outside_window_and_document_are_never_read():
    # NaN keys/values that no query of a tile may see: a kernel that touched those tiles (even
    # with a zero weight) would turn the outputs and gradients of these queries into NaN.
    b, s, h, kvh, d, w, poison = 1, 400, 4, 2, 16, 40, 100
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, s, n, d, generator=gen) for n in (h, kvh, kvh))
    k[:, :poison] = float("nan")
    v[:, :poison] = float("nan")
    far = poison + w + 2 * 64  # queries whose whole 64-row tile starts its keys after the poison
    qs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sliding_window_attention(*qs, window=w)
    out[:, far:].sum().backward()
    assert torch.isfinite(out[:, far:]).all()
    assert all(torch.isfinite(x.grad[:, far:]).all() for x in qs)
    ref = oracle(q[:, poison:].double(), k[:, poison:].double(), v[:, poison:].double(), w, None)
    assert rel_err(out[:, far:], ref[:, far - poison:]) <= 1e-5
    # Same with documents instead of a window: a new document begins after the poison.
    docs = (torch.arange(s) >= poison).long()[None]
    qs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sliding_window_attention(*qs, document_ids=docs)
    out[:, far:].sum().backward()
    assert torch.isfinite(out[:, far:]).all()
    assert all(torch.isfinite(x.grad[:, far:]).all() for x in qs)


def test_noncontiguous_views_equal_contiguous():
    gen = torch.Generator().manual_seed(11)
    qh = torch.randn(2, 6, 70, 16, generator=gen)  # (b, h, s, d): transposed views below
    kvh = torch.randn(2, 4, 70, 16, generator=gen)
    q, k, v = qh.transpose(1, 2), kvh[:, :2].transpose(1, 2), kvh[:, 2:].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.contiguous().clone().requires_grad_() for t in (q, k, v)]
    oa = sliding_window_attention(*a, window=9)
    ob = sliding_window_attention(*b, window=9)
    go = torch.randn(oa.shape, generator=gen).transpose(0, 1).contiguous().transpose(0, 1)
    oa.backward(go)
    ob.backward(go.contiguous())
    assert torch.equal(oa, ob)
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)


def test_backward_is_bitwise_reproducible():
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, 300, n, 32, generator=gen) for n in (6, 2, 2))
    grads = []
    for _ in range(3):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        sliding_window_attention(*xs, window=50).square().sum().backward()
        grads.append([x.grad for x in xs])
    for other in grads[1:]:
        assert all(torch.equal(x, y) for x, y in zip(grads[0], other))


def test_bf16_autocast_and_mixed_dtypes():
    gen = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(1, 80, n, 32, generator=gen) for n in (4, 2, 2))
    ref = oracle(*(t.bfloat16().double() for t in (q, k, v)), 16, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sliding_window_attention(q, k, v, window=16)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= 1e-2
    mixed = sliding_window_attention(q, k.bfloat16(), v, window=16)  # promoted to fp32
    assert mixed.dtype == torch.float32
    assert rel_err(mixed, oracle(q.double(), k.bfloat16().double(), v.double(), 16, None)) <= 1e-5


def test_saves_only_linear_memory_for_backward():
    b, s, h, kvh, d = 1, 512, 4, 2, 16
    q, k, v = (torch.randn(b, s, n, d, requires_grad=True) for n in (h, kvh, kvh))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sliding_window_attention(q, k, v, window=64)
    # q, k, v, o and the (b, h, s) log-sum-exp: nothing of size seq^2.
    assert sum(saved) <= 2 * q.numel() + 2 * k.numel() + b * h * s


def test_key_bounds_give_the_document_window_mask():
    # key_bounds() prepares the CUDA kernel's mask; checked here on the CPU against the oracle.
    gen = torch.Generator().manual_seed(19)
    for kind in (None, "sorted", "unsorted"):
        for w in (0, 1, 5, 30):
            docs = make_docs(kind, 3, 50, gen)
            lo, by_id = key_bounds(50, w, docs, 3, torch.device("cpu"))
            i = torch.arange(50)[:, None]
            j = torch.arange(50)[None, :]
            mask = (j >= lo[:, :, None]) & (j <= i)
            if docs is not None:
                same = docs[:, :, None] == docs[:, None, :]
                mask = mask & (same | ~by_id.bool()[:, None, None])
            want = oracle_mask(50, w or None, docs).expand(3, 1, 50, 50)
            assert torch.equal(mask[:, None], want), (kind, w)


def test_model_uses_kernel_and_trains():
    # The model's attention goes through the C++ kernel (fp32 and bf16) and its loss has gradients.
    import dataclasses

    from megatron_sc2.config import preset
    from megatron_sc2.model import StarCoder2

    cfg = dataclasses.replace(preset("starcoder2-tiny"), sliding_window=8)
    torch.manual_seed(0)
    model = StarCoder2(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    calls = []
    orig = attn.swa_forward

    def spy(*args):
        calls.append(args[0].dtype)
        return orig(*args)

    attn.swa_forward = spy
    try:
        model(tokens).float().logsumexp(-1).mean().backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens)
    finally:
        attn.swa_forward = orig
    assert calls == [torch.float32] * cfg.num_layers + [torch.bfloat16] * cfg.num_layers
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("args,kwargs,match", [
    (((1, 8, 4, 16), (1, 8, 3, 16), (1, 8, 3, 16)), {}, "multiple of kv heads"),
    (((1, 8, 4, 16), (1, 8, 2, 8), (1, 8, 2, 8)), {}, "do not match q"),
    (((2, 8, 4, 16), (1, 9, 2, 16), (1, 9, 2, 16)), {}, "do not match q"),
    (((1, 9, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)), {}, r"q has more positions \(9\) than k/v"),
    (((1, 6, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)), {"document_ids": torch.zeros(1, 6)},
     r"shape \(batch, seq\) = \(1, 8\) \(the key positions\)"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 1, 16)), {}, "k .* and v .* differ"),
    (((8, 4, 16), (8, 2, 16), (8, 2, 16)), {}, "4-d tensor"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)), {"window": 0}, "positive int"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)), {"window": 2.5}, "positive int"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)), {"document_ids": torch.zeros(1, 7)},
     r"shape \(batch, seq\)"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)), {"document_ids": torch.zeros(1, 8)},
     "integers"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)), {"softmax_scale": float("nan")}, "finite"),
])
def test_bad_inputs_raise_clear_errors(args, kwargs, match):
    tensors = [torch.randn(shape) for shape in args]
    with pytest.raises(AttentionInputError, match=match) as info:
        sliding_window_attention(*tensors, **kwargs)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    with pytest.raises(AttentionInputError, match="floating point"):
        sliding_window_attention(torch.ones(1, 2, 1, 4, dtype=torch.long), torch.ones(1, 2, 1, 4),
                                 torch.ones(1, 2, 1, 4))


def test_reference_fallback_when_module_missing(monkeypatch, caplog):
    gen = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(1, 50, n, 16, generator=gen) for n in (4, 2, 2))
    fast = sliding_window_attention(q, k, v, window=10)
    monkeypatch.setitem(kernels._cache, "_attn_cpu", None)
    monkeypatch.setattr(kernels, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="megatron_sc2.ops.kernels"):
        assert attention_backend(q) == "reference"
        slow = sliding_window_attention(q, k, v, window=10)
        sliding_window_attention(q, k, v, window=10)
    assert [r.getMessage() for r in caplog.records if "not built" in r.getMessage()].__len__() == 1
    assert rel_err(fast, slow.double()) <= 1e-5
    monkeypatch.undo()
    monkeypatch.setenv("MEGATRON_SC2_ATTENTION", "reference")
    assert attention_backend(q) == "reference"
    assert attention_backend(q.double()) == "reference"  # no float64 kernel: reference in fp64


def test_thread_count_changes_only_the_dk_dv_summation_order():
    gen = torch.Generator().manual_seed(29)
    # 2*4*300*64*32 = 4.9M multiply-adds: above the kernel's serial cut-off (4.2M), so threads share it.
    q, k, v = (torch.randn(2, 300, n, 32, generator=gen) for n in (4, 2, 2))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            xs = [t.clone().requires_grad_() for t in (q, k, v)]
            out = sliding_window_attention(*xs, window=64)
            out.square().sum().backward()
            results.append((out, *(x.grad for x in xs)))
    finally:
        torch.set_num_threads(before)
    ref = results[0]
    for other in results[1:]:
        assert torch.equal(other[0], ref[0]) and torch.equal(other[1], ref[1])  # out, dq: per tile
        for a, b in zip(other[2:], ref[2:]):  # dk, dv: summed over threads' partial sums
            assert rel_err(a, b.double()) <= 1e-6
