"""The tensor-core CUDA attention kernels (kernel code 0, kernels/cuda/attn_cuda_mma.cuh) run on
the CPU emulator (`_attn_cuda_emu`: the same kernel source compiled by g++, mma.sync and ldmatrix
with the PTX register layouts) against the float64 SDPA oracle of tests/test_attention.py:
forward, log-sum-exp and the three gradients; and mixed with the SIMT kernels (kernel code 1),
whose log-sum-exp format they share.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import pytest
import torch

from megatron_sc2.ops import kernels
from megatron_sc2.ops.attention import cuda_kernel_backward, cuda_kernel_forward, key_bounds
from tests.test_attention import make_docs, oracle, oracle_mask, rel_err
from tests.test_attention_cuda_emu import nan_padded

MMA, SIMT = 0, 1
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def emu():
    if os.environ.get("MEGATRON_SC2_CUDA_EMU", "").strip() == "0":
        pytest.skip("MEGATRON_SC2_CUDA_EMU=0: the emulator module is not built")
    mod = kernels.emu_module()
    assert mod is not None, f"_attn_cuda_emu is not importable: {kernels.load_error('_attn_cuda_emu')}"
    return mod


def _p(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def run(mod, q, k, v, window: Optional[int], docs: Optional[torch.Tensor], dout: torch.Tensor,
        fwd_code: int = MMA, bwd_code: int = MMA, head_splits: int = 0, rows_per_warp: int = 16,
        bwd_warps: int = 4):
    """Forward with kernel `fwd_code`, backward with `bwd_code`, through the calls
    `_CudaAttention` makes (CPU pointers here). Returns o, lse, dq, dk, dv. `head_splits`:
    backward blocks per (key tile, kv head) (0: the kernel's choice, which for these small shapes
    is one block per query head); `rows_per_warp`: the forward's 16 or 32 query rows per warp;
    `bwd_warps`: the backward's 4 or 8 warps (of 16 keys) per block. The inputs are NaN-padded
    copies, so reads out of bounds show up."""
    q, k, v, dout = (nan_padded(t) for t in (q, k, v, dout))
    s, d = k.shape[1], q.shape[3]
    win = 0 if window is None or window >= s else window
    doc = None if docs is None else docs.to(torch.int64).contiguous()
    scale = 1.0 / math.sqrt(d)
    o, lse, lo, by_id = cuda_kernel_forward(mod, q, k, v, doc, win, scale, fwd_code,
                                            rows_per_warp=rows_per_warp)
    dq, dk32, dv32 = cuda_kernel_backward(mod, q, k, v, o, lse, doc, lo, by_id, dout, scale,
                                          bwd_code, head_splits=head_splits, bwd_warps=bwd_warps)
    return o, lse, dq, dk32.to(k.dtype), dv32.to(v.dtype)


def oracle_lse(q, k, window, docs) -> torch.Tensor:
    """(b, h, sq) float64: log2 of sum_j 2^(q.k_j * scale * log2 e) over the visible keys (q may
    hold only the last sq positions)."""
    b, sq, h, d = q.shape
    kk = k.double().repeat_interleave(h // k.shape[2], dim=2)
    x = torch.einsum("bihd,bjhd->bhij", q.double(), kk) / math.sqrt(d) / math.log(2.0)
    x = x.masked_fill(~oracle_mask(k.shape[1], window, docs, sq), float("-inf"))
    return torch.logsumexp(x * math.log(2.0), dim=-1) / math.log(2.0)


def inputs(case: tuple, dtype: torch.dtype, seed: int):
    b, s, h, kvh, d, window, doc_kind = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v, go = (torch.randn(shape, generator=gen).to(dtype) for shape in
                   ((b, s, h, d), (b, s, kvh, d), (b, s, kvh, d), (b, s, h, d)))
    return q, k, v, go, make_docs(doc_kind, b, s, gen)


def reference(q, k, v, go, window, docs):
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    out = oracle(*ref_in, window, docs)
    out.backward(go.double())
    return out.detach(), [t.grad for t in ref_in]


# (batch, seq, heads, kv_heads, head_dim, window, documents): seq 1, 77, 200 ... never a multiple
# of the 64-row tiles; windows < seq, >= seq, None and 1; GQA groups 1, 2, 4; batch 2; sorted and
# unsorted document ids.
CASES = [
    (1, 1, 1, 1, 64, None, None),
    (2, 77, 2, 1, 64, 16, None),
    (1, 200, 4, 1, 128, 70, "sorted"),
    (2, 130, 2, 2, 64, 1, "unsorted"),
    (1, 150, 2, 1, 128, 300, "unsorted"),
    (2, 90, 4, 2, 64, None, "sorted"),
    (1, 333, 4, 2, 64, 100, "sorted"),
    (1, 150, 2, 2, 128, 40, "unsorted"),
    (2, 129, 4, 4, 128, 129, None),
]


# (forward query rows per warp, backward warps per block): the default shapes and the larger ones.
SHAPES = [(16, 4), (32, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"fwd{r}-bwd{w}" for r, w in SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_mma_matches_float64(emu, case, dtype, shape):
    window = case[5]
    q, k, v, go, docs = inputs(case, dtype, CASES.index(case))
    o, lse, dq, dk, dv = run(emu, q, k, v, window, docs, go, rows_per_warp=shape[0],
                             bwd_warps=shape[1])
    ref, (rdq, rdk, rdv) = reference(q, k, v, go, window, docs)
    errs = {"out": rel_err(o, ref), "dq": rel_err(dq, rdq), "dk": rel_err(dk, rdk),
            "dv": rel_err(dv, rdv)}
    assert all(e <= TOL[dtype] for e in errs.values()), (case, errs)
    # Scores come from exact fp16/bf16 products summed in fp32: lse is fp32-accurate.
    assert (lse.double() - oracle_lse(q, k, window, docs)).abs().max().item() <= 1e-4


# Fewer queries than keys (the last positions; context parallelism's chunk after its halo):
# (case, queries), offsets on and off the 64-key tiles, windows below and above the query count.
OFFSET_CASES = [((2, 200, 4, 2, 64, 70, None), 64), ((1, 333, 4, 1, 128, 100, "sorted"), 130),
                ((2, 150, 2, 2, 64, None, "unsorted"), 1), ((1, 129, 6, 2, 64, 20, "sorted"), 77)]


@pytest.mark.parametrize("shape", SHAPES + [(16, 8)], ids=lambda s: f"fwd{s[0]}-bwd{s[1]}")
@pytest.mark.parametrize("case,queries", OFFSET_CASES,
                         ids=[f"{c}-q{n}" for c, n in OFFSET_CASES])
def test_mma_offset_queries_match_float64(emu, case, queries, shape):
    window = case[5]
    q, k, v, go, docs = inputs(case, torch.bfloat16, 60 + OFFSET_CASES.index((case, queries)))
    q, go = q[:, -queries:].contiguous(), go[:, -queries:].contiguous()
    o, lse, dq, dk, dv = run(emu, q, k, v, window, docs, go, rows_per_warp=shape[0],
                             bwd_warps=shape[1], head_splits=1 + (shape[1] == 8))
    assert o.shape == q.shape and lse.shape == (case[0], case[2], queries)
    ref, (rdq, rdk, rdv) = reference(q, k, v, go, window, docs)
    errs = {"out": rel_err(o, ref), "dq": rel_err(dq, rdq), "dk": rel_err(dk, rdk),
            "dv": rel_err(dv, rdv)}
    assert all(e <= TOL[torch.bfloat16] for e in errs.values()), (case, queries, errs)
    assert (lse.double() - oracle_lse(q, k, window, docs)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("bwd_warps", [4, 8])
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("case", [(2, 150, 6, 2, 64, 50, "sorted"),
                                  (1, 100, 4, 1, 128, None, "unsorted")], ids=["group3", "group4"])
def test_mma_backward_head_splits(emu, case, splits, bwd_warps):
    """The group's query heads in one block (dK/dV stored) or split unevenly over blocks (added)."""
    window = case[5]
    q, k, v, go, docs = inputs(case, torch.bfloat16, 11)
    o, _, dq, dk, dv = run(emu, q, k, v, window, docs, go, head_splits=splits, bwd_warps=bwd_warps)
    ref, (rdq, rdk, rdv) = reference(q, k, v, go, window, docs)
    errs = {"out": rel_err(o, ref), "dq": rel_err(dq, rdq), "dk": rel_err(dk, rdk), "dv": rel_err(dv, rdv)}
    assert all(e <= 1e-2 for e in errs.values()), errs


@pytest.mark.parametrize("fwd_code,bwd_code", [(MMA, SIMT), (SIMT, MMA)],
                         ids=["mma-fwd+simt-bwd", "simt-fwd+mma-bwd"])
def test_mma_and_simt_share_lse(emu, fwd_code, bwd_code):
    """Either family's forward feeds either family's backward (lse format, dK/dV buffers)."""
    case = (2, 100, 4, 2, 64, 30, "sorted")
    window = case[5]
    q, k, v, go, docs = inputs(case, torch.bfloat16, 7)
    o, lse, dq, dk, dv = run(emu, q, k, v, window, docs, go, fwd_code, bwd_code)
    _, lse_other, *_ = run(emu, q, k, v, window, docs, go, bwd_code, bwd_code)
    assert (lse - lse_other).abs().max().item() <= 1e-4
    ref, (rdq, rdk, rdv) = reference(q, k, v, go, window, docs)
    errs = {"out": rel_err(o, ref), "dq": rel_err(dq, rdq), "dk": rel_err(dk, rdk), "dv": rel_err(dv, rdv)}
    assert all(e <= 1e-2 for e in errs.values()), errs


def test_mma_forward_rejects_other_rows_per_warp(emu):
    q = torch.randn(1, 8, 1, 64).to(torch.bfloat16)
    lo, _ = key_bounds(8, 0, None, 1, q.device)
    lse = torch.zeros(1, 1, 8)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="rows per warp"):
        emu.forward(_p(q), _p(q), _p(q), _p(out), _p(lse), _p(lo), 0, 0, 1, 8, 1, 1, 64, 0.125, 1,
                    0, MMA, 8)


def test_mma_backward_rejects_other_warp_counts(emu):
    q = torch.randn(1, 8, 1, 64).to(torch.bfloat16)
    lo, _ = key_bounds(8, 0, None, 1, q.device)
    lse = torch.zeros(1, 1, 8)
    out = torch.empty_like(q)
    f32 = torch.zeros(q.shape)
    with pytest.raises(RuntimeError, match="warps per block"):
        emu.backward(_p(q), _p(q), _p(q), _p(q), _p(lse), _p(lse), _p(lo), 0, 0, _p(out), _p(f32),
                     _p(f32), 1, 8, 1, 1, 64, 0.125, 1, 0, MMA, _p(f32), 0, 6)


def test_mma_rejects_misaligned_rows(emu):
    """The kernels move 16-byte vectors: a pointer off by one element is an error, not a fault."""
    buf = torch.randn(1 * 8 * 1 * 64 + 8).to(torch.bfloat16)
    q = buf[1:1 + 8 * 64].view(1, 8, 1, 64)  # contiguous, 2 bytes past a 16-byte boundary
    lo, _ = key_bounds(8, 0, None, 1, q.device)
    lse = torch.zeros(1, 1, 8)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        emu.forward(_p(q), _p(out), _p(out), _p(out), _p(lse), _p(lo), 0, 0, 1, 8, 1, 1, 64, 0.125, 1,
                    0, MMA)
    # ... which the Python calls avoid by copying such a view.
    k = torch.randn(1, 8, 1, 64).to(torch.bfloat16)
    go = torch.randn(1, 8, 1, 64).to(torch.bfloat16)
    o, _, dq, dk, dv = run(emu, q, k, k, None, None, go)
    ref, (rdq, rdk, rdv) = reference(q, k, k, go, None, None)
    assert rel_err(o, ref) <= 1e-2 and rel_err(dq, rdq) <= 1e-2


def test_non_positive_scale(emu):
    """The tensor-core kernels refuse scale <= 0; the Python calls use the SIMT kernels then."""
    q, k, v, go, _ = inputs((1, 50, 2, 1, 64, None, None), torch.bfloat16, 5)
    lo, _ = key_bounds(50, 0, None, 1, q.device)
    lse = torch.zeros(1, 2, 50)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="scale must be positive"):
        emu.forward(_p(q), _p(k), _p(v), _p(out), _p(lse), _p(lo), 0, 0, 1, 50, 2, 1, 64, -0.125, 1,
                    0, MMA)
    for scale in (-0.125, 0.0):
        o, lse, lo, by_id = cuda_kernel_forward(emu, q, k, v, None, 0, scale, MMA)
        dq, dk, dv = cuda_kernel_backward(emu, q, k, v, o, lse, None, lo, by_id, go, scale, MMA)
        ref_in = [t.double().requires_grad_() for t in (q, k, v)]
        ref = oracle(*ref_in, None, None, scale=scale)
        ref.backward(go.double())
        errs = [rel_err(o, ref), rel_err(dq, ref_in[0].grad), rel_err(dk, ref_in[1].grad),
                rel_err(dv, ref_in[2].grad)]
        assert all(e <= 1e-2 for e in errs), (scale, errs)


def test_mma_backward_without_dq_scratch_fails_clearly(emu):
    q = torch.randn(1, 8, 1, 64).to(torch.bfloat16)
    k = torch.randn(1, 8, 1, 64).to(torch.bfloat16)
    lo, _ = key_bounds(8, 0, None, 1, q.device)
    lse = torch.zeros(1, 1, 8)
    out = torch.empty_like(q)
    dk = torch.zeros(k.shape)
    with pytest.raises(RuntimeError, match="dq32"):
        emu.backward(_p(q), _p(k), _p(k), _p(q), _p(lse), _p(lse), _p(lo), 0, 0, _p(out), _p(dk),
                     _p(dk), 1, 8, 1, 1, 64, 0.125, 1, 0, MMA)
