"""The CUDA attention module: built wherever a CUDA toolkit exists; on a GPU, equal to a float64
SDPA oracle (forward and the three gradients). Without a GPU the numeric tests skip."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from megatron_sc2.ops import kernels
from megatron_sc2.ops.attention import attention_backend, sliding_window_attention
from tests.test_attention import make_docs, oracle, oracle_mask, rel_err

REPO = Path(__file__).resolve().parent.parent


def _build_module():
    spec = importlib.util.spec_from_file_location("sc2_kernels_build", REPO / "kernels" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def test_cuda_module_built_where_a_toolkit_exists():
    build = _build_module()
    if os.environ.get("MEGATRON_SC2_CUDA", "").strip() == "0":
        pytest.skip("MEGATRON_SC2_CUDA=0: CUDA build switched off")
    if build.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit on this machine")
    assert kernels.cuda_module() is not None, (
        f"a CUDA toolkit exists but _attn_cuda is not importable: {kernels.load_error('_attn_cuda')}")


def test_cuda_module_without_gpu_raises_cleanly():
    mod = kernels.cuda_module()
    if mod is None:
        pytest.skip("CUDA module not built")
    if mod.device_count() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        mod.forward(0, 0, 0, 0, 0, 0, 0, 0, 1, 8, 2, 1, 64, 0.125, 1, 0, 1)
    with pytest.raises(ValueError, match="head dim"):
        mod.forward(0, 0, 0, 0, 0, 0, 0, 0, 1, 8, 2, 1, 48, 0.125, 1, 0, 1)


needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.cuda_module() is not None
         and kernels.cuda_module().device_count() > 0),
    reason="needs a CUDA device and the CUDA module")

GPU_CASES = [  # (batch, seq, heads, kv_heads, window, documents)
    (1, 1, 1, 1, None, None),
    (2, 100, 4, 2, 16, None),
    (1, 333, 6, 2, None, None),
    (2, 177, 8, 1, 1, "sorted"),
    (1, 300, 6, 3, 64, "sorted"),
    (3, 130, 3, 3, 130, "unsorted"),
    (1, 257, 12, 2, 500, None),
    (2, 200, 24, 2, 50, "unsorted"),
]


# Kernel families and their shape knobs: SIMT; tensor cores with the default shapes; tensor cores
# with 32 forward rows per warp and 8 backward warps per block.
FAMILIES = {"simt": {"MEGATRON_SC2_CUDA_KERNEL": "simt"},
            "mma": {"MEGATRON_SC2_CUDA_KERNEL": "mma"},
            "mma-rows32-bwd8": {"MEGATRON_SC2_CUDA_KERNEL": "mma",
                                "MEGATRON_SC2_MMA_ROWS_PER_WARP": "32",
                                "MEGATRON_SC2_MMA_BWD_WARPS": "8"}}


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", GPU_CASES, ids=[str(c) for c in GPU_CASES])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_matches_float64(case, head_dim, dtype, family, monkeypatch):
    for name, value in FAMILIES[family].items():
        monkeypatch.setenv(name, value)
    b, s, h, kvh, window, doc_kind = case
    gen = torch.Generator().manual_seed(GPU_CASES.index(case))
    q, k, v, go = (torch.randn(shape, generator=gen).to(dtype) for shape in
                   ((b, s, h, head_dim), (b, s, kvh, head_dim), (b, s, kvh, head_dim),
                    (b, s, h, head_dim)))
    docs = make_docs(doc_kind, b, s, gen)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = oracle(*ref_in, window, docs)
    ref.backward(go.double())
    ours_in = [t.cuda().requires_grad_() for t in (q, k, v)]
    assert attention_backend(ours_in[0]) == "cuda"
    out = sliding_window_attention(*ours_in, window=window,
                                   document_ids=None if docs is None else docs.cuda())
    out.backward(go.cuda())
    torch.cuda.synchronize()
    errs = {"out": rel_err(out.cpu(), ref)}
    for name, a, r in zip("qkv", ours_in, ref_in):
        assert a.grad.dtype == dtype
        errs[f"d{name}"] = rel_err(a.grad.cpu(), r.grad)
    assert max(errs.values()) <= 1e-2, (case, errs)


# Long sequences, many tiles and the 3B head layout (24 / 2: the tensor-core backward splits the
# group's heads over blocks): what the emulator never runs, since its shapes stay small.
LARGE_CASES = [  # (batch, seq, heads, kv_heads, head_dim, window, documents)
    (1, 2048, 24, 2, 128, 512, None),
    (2, 1500, 16, 4, 64, 1024, "sorted"),
    (1, 1024, 8, 2, 128, None, "unsorted"),
]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", LARGE_CASES, ids=[str(c) for c in LARGE_CASES])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_large_shapes_match_float64(case, family, monkeypatch):
    for name, value in FAMILIES[family].items():
        monkeypatch.setenv(name, value)
    b, s, h, kvh, d, window, doc_kind = case
    gen = torch.Generator().manual_seed(s + h)
    q, k, v, go = (torch.randn(shape, generator=gen).to(torch.bfloat16).cuda() for shape in
                   ((b, s, h, d), (b, s, kvh, d), (b, s, kvh, d), (b, s, h, d)))
    docs = make_docs(doc_kind, b, s, gen)
    # The float64 oracle on the GPU (on the CPU it would take minutes at these sizes).
    mask = oracle_mask(s, window, docs).cuda()
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in ref_in), attn_mask=mask, enable_gqa=h != kvh).transpose(1, 2)
    ref.backward(go.double())
    ours_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = sliding_window_attention(*ours_in, window=window,
                                   document_ids=None if docs is None else docs.cuda())
    out.backward(go)
    torch.cuda.synchronize()
    errs = {"out": rel_err(out, ref)}
    for name, a, r in zip("qkv", ours_in, ref_in):
        errs[f"d{name}"] = rel_err(a.grad, r.grad)
    assert max(errs.values()) <= 1e-2, (case, family, errs)


# Fewer queries than keys (the last positions): the context-parallel call, CP4 rank 3's shape at
# 16k / window 4096 (4096 queries against 8191 keys) and a small one with unsorted documents.
OFFSET_GPU_CASES = [  # (batch, keys, queries, heads, kv_heads, head_dim, window, documents)
    (1, 8191, 4096, 8, 2, 128, 4096, None),
    (2, 300, 77, 6, 2, 64, 50, "unsorted"),
    (1, 500, 130, 4, 1, 128, None, "sorted"),
]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", OFFSET_GPU_CASES, ids=[str(c) for c in OFFSET_GPU_CASES])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_offset_queries_match_float64(case, family, monkeypatch):
    for name, value in FAMILIES[family].items():
        monkeypatch.setenv(name, value)
    b, s, sq, h, kvh, d, window, doc_kind = case
    gen = torch.Generator().manual_seed(s + sq)
    q, go = (torch.randn(b, sq, h, d, generator=gen).to(torch.bfloat16).cuda() for _ in range(2))
    k, v = (torch.randn(b, s, kvh, d, generator=gen).to(torch.bfloat16).cuda() for _ in range(2))
    docs = make_docs(doc_kind, b, s, gen)
    mask = oracle_mask(s, window, docs, sq).cuda()
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in ref_in), attn_mask=mask, enable_gqa=h != kvh).transpose(1, 2)
    ref.backward(go.double())
    ours_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = sliding_window_attention(*ours_in, window=window,
                                   document_ids=None if docs is None else docs.cuda())
    out.backward(go)
    torch.cuda.synchronize()
    errs = {"out": rel_err(out, ref)}
    for name, a, r in zip("qkv", ours_in, ref_in):
        errs[f"d{name}"] = rel_err(a.grad, r.grad)
    assert max(errs.values()) <= 1e-2, (case, family, errs)


@needs_gpu
@pytest.mark.gpu
def test_cuda_model_forward_matches_cpu():
    import dataclasses

    from megatron_sc2.config import preset
    from megatron_sc2.model import StarCoder2

    cfg = dataclasses.replace(preset("starcoder2-tiny"), hidden_size=256, num_attention_heads=4,
                              num_query_groups=2)  # head dim 64: the CUDA kernel's
    torch.manual_seed(0)
    model = StarCoder2(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 100))
    with torch.no_grad():
        ref = model(tokens).float()
        model = model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(tokens.cuda()).float().cpu()
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
