"""The CUDA kernels run on the CPU by the emulator (`_attn_cuda_emu`, kernels/cuda/emu/).

Part 1: the emulator itself against things no one here wrote: torch's fp16/bf16 rounding, torch
matmul for mma.m16n8k16 with fragments built from the PTX ISA formulas and loaded by ldmatrix,
the CUDA Programming Guide's shuffle semantics; and faulty kernels it must reject or expose.
Part 2: the SIMT attention kernels (kernel code 1) through it against the float64 SDPA oracle.

`run_emulated` is the helper other tests import to run a kernel family on the emulator.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import pytest
import torch

from megatron_sc2.ops import kernels
from megatron_sc2.ops.attention import cuda_kernel_backward, cuda_kernel_forward
from tests.test_attention import make_docs, oracle, rel_err

SIMT, MMA = 1, 0


def emu():
    mod = kernels.emu_module()
    if mod is None:
        pytest.skip(f"_attn_cuda_emu not built: {kernels.load_error('_attn_cuda_emu')}")
    return mod


def nan_padded(t: torch.Tensor, pad: int = 4096) -> torch.Tensor:
    """A contiguous copy of t inside a buffer with `pad` NaNs on both sides, so a kernel reading
    out of bounds (in the emulator, plain CPU memory) gets NaN instead of a neighbour's data."""
    buf = torch.full((t.numel() + 2 * pad,), math.nan, dtype=t.dtype)
    view = buf[pad:pad + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def run_emulated(kernel_code: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 window: Optional[int], doc: Optional[torch.Tensor], dout: torch.Tensor,
                 scale: Optional[float] = None) -> tuple[torch.Tensor, ...]:
    """Forward and backward of CUDA kernel family `kernel_code` (0 tensor cores, 1 SIMT) on the
    emulator, called as `_CudaAttention` calls `_attn_cuda`. q (b, sq, h, d), k/v (b, s, kv, d)
    with sq <= s (the queries are the last positions), CPU fp16/bf16; window None or >= 1; doc
    (b, s) ids or None. Returns (o, dq) in q's dtype and
    (dk, dv) in fp32 as the kernel accumulated them. The inputs are NaN-padded copies."""
    mod = emu()
    q, k, v, dout = (nan_padded(t) for t in (q, k, v, dout.to(q.dtype)))
    s = k.shape[1]
    win = 0 if window is None or window >= s else int(window)
    sc = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    doc = None if doc is None else doc.to(torch.int64).contiguous()
    o, lse, lo, by_id = cuda_kernel_forward(mod, q, k, v, doc, win, sc, kernel_code)
    dq, dk, dv = cuda_kernel_backward(mod, q, k, v, o, lse, doc, lo, by_id, dout, sc, kernel_code)
    return o, dq, dk, dv


def test_emulator_module_is_built():
    if os.environ.get("MEGATRON_SC2_CUDA_EMU", "").strip() == "0":
        pytest.skip("MEGATRON_SC2_CUDA_EMU=0: emulator build switched off")
    assert kernels.emu_module() is not None, kernels.load_error("_attn_cuda_emu")
    assert kernels.emu_module().device_count() == 1


# ---- part 1: the emulator ---------------------------------------------------------------------

def test_conversions_round_like_torch():
    mod = emu()
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(4000, generator=gen) * torch.logspace(-9, 5, 4000).float(),
        torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 65536.0, 1e6, -7e4, 6e-8, 3e-8,
                      2.9802322e-08, 5.9604645e-08, 8.940697e-08, 6.1035156e-05, 6.097e-05,
                      1.0009765625, 1.00048828125, 1.00146484375, 3.4e38, 1.1754944e-38,
                      math.inf, -math.inf]),
        # exact halfway cases for both formats: mantissa bits just at the rounding boundary
        torch.tensor([0x3F801000, 0x3F803000, 0x3F808000, 0x3F818000, 0x38801000, 0x33000000,
                      0x33400000], dtype=torch.int32).view(torch.float32),
    ])
    n = x.numel()
    hb, bb = torch.empty(n, dtype=torch.int16), torch.empty(n, dtype=torch.int16)
    hf, bf = torch.empty(n), torch.empty(n)
    outs = [t.data_ptr() for t in (hb, bb, hf, bf)]
    mod.selftest_convert(x.data_ptr(), n, *outs)
    assert torch.equal(hb, x.half().view(torch.int16))
    assert torch.equal(bb, x.bfloat16().view(torch.int16))
    assert torch.equal(hf, x.half().float()) and torch.equal(bf, x.bfloat16().float())
    nan = torch.tensor([math.nan])
    mod.selftest_convert(nan.data_ptr(), 1, *outs)
    assert hf[0].isnan() and bf[0].isnan()


MMA_MODES = {0: "fragments by hand", 1: "ldmatrix x4 + x2.trans (B k x n)",
             2: "ldmatrix x4 + x2 (B stored n x k)", 3: "ldmatrix x4.trans (B k x 16)",
             4: "ldmatrix x4 (B stored 16 x k)"}


@pytest.mark.parametrize("mode", sorted(MMA_MODES), ids=list(MMA_MODES.values()))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_matches_torch_matmul(dtype, mode):
    mod = emu()
    gen = torch.Generator().manual_seed(mode)
    n = 16 if mode >= 3 else 8
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, n, generator=gen).to(dtype)
    c = torch.randn(16, n, generator=gen)
    d = torch.full((16, n), math.nan)
    b_in = b.t().contiguous() if mode in (2, 4) else b.contiguous()
    mod.selftest_mma(a.data_ptr(), b_in.data_ptr(), c.data_ptr(), d.data_ptr(),
                     0 if dtype == torch.float16 else 1, mode)
    ref = a.double() @ b.double() + c.double()
    assert (d.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def _shuffle_expected(x: torch.Tensor) -> torch.Tensor:
    """Row by row what shuffle_kernel (emu_selftest.cu) must produce, from the CUDA Programming
    Guide: __shfl_sync reads lane srcLane % width of the caller's width-segment; __shfl_up_sync
    lane - delta and __shfl_down_sync lane + delta, keeping the own value when that leaves the
    segment; __shfl_xor_sync lane ^ mask, keeping the own value when that is a later segment."""
    rows = []
    n = x.numel()

    def gather(src_of):
        return torch.tensor([int(x[(i // 32) * 32 + src_of(i % 32)]) for i in range(n)],
                            dtype=torch.int32)

    def seg(lane, w):
        return (lane // w) * w

    rows.append(gather(lambda l: (l * 7 + 3) % 32))
    rows.append(gather(lambda l: seg(l, 8) + (l + 5) % 8))
    rows.append(gather(lambda l: seg(l, 16) + (31 - l) % 16))
    rows.append(gather(lambda l: l - 3 if l - 3 >= 0 else l))
    rows.append(gather(lambda l: l - 3 if l - 3 >= seg(l, 16) else l))
    rows.append(gather(lambda l: l + 5 if l + 5 < 32 else l))
    rows.append(gather(lambda l: l + 5 if l + 5 < seg(l, 8) + 8 else l))
    rows.append(gather(lambda l: l ^ 13))
    rows.append(gather(lambda l: l ^ 4 if (l ^ 4) < seg(l, 4) + 4 else l))
    w = x.view(-1, 32)
    rows.append(w.sum(1, keepdim=True).expand(-1, 32).reshape(-1))
    rows.append(w.max(1, keepdim=True).values.expand(-1, 32).reshape(-1))
    q = x.view(-1, 4)
    rows.append(q.sum(1, keepdim=True).expand(-1, 4).reshape(-1))
    rows.append(q.max(1, keepdim=True).values.expand(-1, 4).reshape(-1))
    rows.append(gather(lambda l: l ^ 1))
    return torch.stack([r.to(torch.int32) for r in rows])


def test_shuffles_follow_cuda_semantics():
    mod = emu()
    x = torch.randperm(64, generator=torch.Generator().manual_seed(1)).to(torch.int32) * 3 - 50
    expected = _shuffle_expected(x)
    out = torch.full(expected.shape, -999999, dtype=torch.int32)
    mod.selftest_shuffle(x.data_ptr(), out.data_ptr())
    for row in range(expected.shape[0]):
        assert torch.equal(out[row], expected[row]), (row, out[row], expected[row])


@pytest.mark.parametrize("dynamic_smem", [False, True], ids=["static", "dynamic"])
def test_missing_syncthreads_reads_unwritten_shared_memory(dynamic_smem):
    mod = emu()
    x = torch.randn(512, generator=torch.Generator().manual_seed(2))
    good, bad = torch.empty(512), torch.empty(512)
    mod.selftest_barrier(x.data_ptr(), good.data_ptr(), True, dynamic_smem)
    assert torch.equal(good, x.view(4, 128).roll(-64, 1).reshape(-1))
    mod.selftest_barrier(x.data_ptr(), bad.data_ptr(), False, dynamic_smem)
    # every block (warps in either order) reads shared memory its writers have not reached yet
    assert bad.view(4, 128).isnan().any(dim=1).all()


FAULTS = {
    "divergent_barrier": "exited while 32 thread\\(s\\) of its block wait at __syncthreads",
    "divergent_shuffle": "deadlock .*16 lane\\(s\\) at a warp collective, 16 elsewhere",
    "shuffle_vs_barrier": "deadlock .*32 thread\\(s\\) at __syncthreads",
    "partial_mask": "member mask 0x0000ffff",
    "mixed_collectives": "lane 0 waits at a shuffle, lane 16 at __syncwarp",
    "ldmatrix_misaligned": "not 16-byte aligned",
    "ldmatrix_global": "not in shared memory",
    "smem_over_default": "invalid argument .*65536 bytes of dynamic shared memory, the kernel "
                         "allows 49152",
    "smem_overflow": "write to byte 276 of 256 bytes of dynamic shared memory",
    "smem_attribute_too_big": "invalid argument .*233472 > 232448",
    "block_too_big": "invalid configuration argument",
}


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_faulty_kernels_are_rejected(name):
    import re

    mod = emu()
    assert mod.selftest_fault("ok") == ""
    err = mod.selftest_fault(name)
    assert re.search(FAULTS[name], err), err


# ---- part 2: the SIMT attention kernels --------------------------------------------------------

# (batch, seq, heads, kv_heads, head_dim, window, documents): seq never a multiple of the 64-row
# tiles; window < seq, == seq, > seq, None and 1; GQA groups 1, 2, 4; each in fp16 and bf16.
EMU_CASES = [
    (1, 1, 1, 1, 64, None, None),
    (2, 100, 4, 2, 64, 16, None),
    (1, 130, 4, 1, 128, None, None),
    (2, 77, 2, 2, 64, 1, "sorted"),
    (1, 200, 4, 2, 128, 64, "sorted"),
    (2, 65, 2, 2, 128, 65, "unsorted"),
    (1, 129, 4, 1, 64, 300, None),
    (2, 150, 4, 2, 64, 37, "unsorted"),
    (2, 190, 4, 1, 128, 70, "sorted"),
    (1, 97, 2, 1, 128, 50, "unsorted"),
]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def case_inputs(case, seed, dtype):
    b, s, h, kvh, d, window, doc_kind = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v, go = (torch.randn(shape, generator=gen).to(dtype) for shape in
                   ((b, s, h, d), (b, s, kvh, d), (b, s, kvh, d), (b, s, h, d)))
    return q, k, v, go, make_docs(doc_kind, b, s, gen)


def check_against_oracle(kernel_code: int, case, seed: int, dtype: torch.dtype,
                         queries: Optional[int] = None) -> dict:
    """Runs `case` through kernel family `kernel_code` on the emulator; the errors vs float64.
    `queries`: only the last that many positions are queries (an offset call)."""
    window = case[5]
    q, k, v, go, docs = case_inputs(case, seed, dtype)
    if queries is not None:
        q, go = q[:, -queries:].contiguous(), go[:, -queries:].contiguous()
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = oracle(*ref_in, window, docs)
    ref.backward(go.double())
    o, dq, dk, dv = run_emulated(kernel_code, q, k, v, window, docs, go)
    assert o.dtype == dq.dtype == dtype
    errs = {"out": rel_err(o, ref), "dq": rel_err(dq, ref_in[0].grad),
            "dk": rel_err(dk, ref_in[1].grad), "dv": rel_err(dv, ref_in[2].grad)}
    assert max(errs.values()) <= TOLERANCE[dtype], (case, errs)
    return errs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", EMU_CASES, ids=[str(c) for c in EMU_CASES])
def test_simt_kernels_match_float64(case, dtype):
    emu()
    check_against_oracle(SIMT, case, EMU_CASES.index(case), dtype)


# Fewer queries than keys (context parallelism's chunk after its halo), on both families.
OFFSET_EMU_CASES = [((2, 100, 4, 2, 64, 16, None), 37), ((1, 150, 4, 1, 128, 70, "sorted"), 64),
                    ((1, 97, 2, 1, 64, None, "unsorted"), 1), ((2, 90, 2, 1, 64, 200, None), 90)]


@pytest.mark.parametrize("kernel_code", [SIMT, MMA], ids=["simt", "mma"])
@pytest.mark.parametrize("case,queries", OFFSET_EMU_CASES,
                         ids=[f"{c}-q{n}" for c, n in OFFSET_EMU_CASES])
def test_offset_queries_match_float64(kernel_code, case, queries):
    emu()
    check_against_oracle(kernel_code, case, 50, torch.bfloat16, queries=queries)


def test_offset_lse_and_mixed_families(case=((2, 120, 4, 2, 64, 30, "sorted"), 50)):
    # SIMT's lse of an offset call is the oracle's (b, h, sq); a forward of one family feeds the
    # other's backward with the offset too.
    mod = emu()
    (b, s, h, kvh, d, window, kind), sq = case
    q, k, v, go, docs = case_inputs(case[0], 9, torch.bfloat16)
    q, go = q[:, -sq:].contiguous(), go[:, -sq:].contiguous()
    from tests.test_attention import oracle_mask
    x = torch.einsum("bihd,bjhd->bhij", q.double(), k.double().repeat_interleave(h // kvh, dim=2))
    x = (x / math.sqrt(d)).masked_fill(~oracle_mask(s, window, docs, sq), -math.inf)
    ref_lse = torch.logsumexp(x, dim=-1) / math.log(2.0)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = oracle(*ref_in, window, docs)
    ref.backward(go.double())
    for fwd, bwd in ((SIMT, MMA), (MMA, SIMT)):
        o, lse, lo, by_id = cuda_kernel_forward(mod, q, k, v, docs, window, 1 / math.sqrt(d), fwd)
        assert lse.shape == (b, h, sq) and (lse.double() - ref_lse).abs().max().item() <= 1e-4
        dq, dk, dv = cuda_kernel_backward(mod, q, k, v, o, lse, docs, lo, by_id, go,
                                          1 / math.sqrt(d), bwd)
        errs = [rel_err(o, ref)] + [rel_err(g, r.grad) for g, r in zip((dq, dk, dv), ref_in)]
        assert max(errs) <= 1e-2, (fwd, bwd, errs)


def test_simt_lse_is_the_base2_logsumexp():
    """The saved statistics the backward relies on, checked directly (not only through dQ)."""
    mod = emu()
    case = (2, 70, 2, 1, 64, 20, "sorted")
    q, k, v, _, docs = case_inputs(case, 3, torch.bfloat16)
    scale = 0.125
    o, lse, lo, by_id = cuda_kernel_forward(mod, q, k, v, docs, 20, scale, SIMT)
    from tests.test_attention import oracle_mask

    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double().repeat_interleave(2, dim=2)) * scale
    s = s.masked_fill(~oracle_mask(70, 20, docs), -math.inf)
    ref = torch.logsumexp(s, dim=-1) / math.log(2.0)
    assert (lse.double() - ref).abs().max().item() <= 1e-4


def test_bad_sizes_raise():
    mod = emu()
    with pytest.raises(ValueError, match="head dim"):
        mod.forward(0, 0, 0, 0, 0, 0, 0, 0, 1, 8, 2, 1, 48, 0.125, 1, 0, 1)
