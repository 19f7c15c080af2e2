"""Context parallelism's attention step in one process: the chunk's queries over [halo, chunk]
keys (fewer queries than keys) equal the rows of a full-sequence call,
outputs and gradients, on every backend this machine has. The multi-process exchange itself is
tested in tests/test_parallel.py (tests/dist/parallel_equivalence.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_sc2.ops import sliding_window_attention
from megatron_sc2.parallel.context_parallel import attention_after_halo, halo_length

DEVICES = [("cpu", torch.float32, 1e-5)]
if torch.cuda.is_available():
    DEVICES.append(("cuda", torch.bfloat16, 2e-2))


@pytest.mark.parametrize("device,dtype,tol", DEVICES)
@pytest.mark.parametrize("window,docs", [(8, False), (8, True), (20, True), (None, False)])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_chunk_attention_equals_the_full_sequence_rows(device, dtype, tol, window, docs, backend,
                                                       monkeypatch):
    monkeypatch.setenv("MEGATRON_SC2_ATTENTION", backend)
    g = torch.Generator().manual_seed(3)
    b, s, h, kvh, d, cp = 2, 48, 4, 2, 64, 4
    chunk = s // cp
    q, k, v = (torch.randn(b, s, n, d, generator=g).to(device, dtype).requires_grad_()
               for n in (h, kvh, kvh))
    ids = None
    if docs:
        ids = (torch.rand(b, s, generator=g) < 0.1).long().cumsum(1).to(device)
    full = sliding_window_attention(q, k, v, window=window, document_ids=ids)
    dout = torch.randn(full.shape, generator=g).to(device, dtype)
    want = torch.autograd.grad(full, (q, k, v), dout)
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for r in range(cp):
        lo, start = r * chunk - halo_length(r, chunk, window), r * chunk
        qc = q[:, start:start + chunk]
        kc, vc = k[:, lo:start + chunk], v[:, lo:start + chunk]
        idc = None if ids is None else ids[:, lo:start + chunk]
        out = attention_after_halo(qc, kc, vc, window, None, idc)
        torch.testing.assert_close(out, full[:, start:start + chunk], atol=tol, rtol=tol)
        got = torch.autograd.grad(out, (q, k, v), dout[:, start:start + chunk])
        for acc, g_ in zip(grads, got):
            acc += g_
    for name, a, w in zip("qkv", grads, want):
        torch.testing.assert_close(a.float(), w.float(), atol=tol * 4, rtol=tol * 4, msg=name)
