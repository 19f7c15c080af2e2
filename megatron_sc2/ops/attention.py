"""Sliding-window grouped-query attention: the one entry point the model calls.

`sliding_window_attention(q, k, v, window=None, softmax_scale=None, document_ids=None)`:
q (batch, sq, heads, head_dim), k/v (batch, seq, kv_heads, head_dim) with sq <= seq -> (batch,
sq, heads, head_dim). The queries are the last sq positions of the key sequence (sq < seq: a
context-parallel chunk after its halo; usually sq == seq): query row t is position
i = t + seq - sq and sees keys i - window < j <= i (window=None: plain causal); with
`document_ids` (batch, seq), given for the keys, it also sees only keys of its own document.

Backends, chosen per call: the CUDA kernel for CUDA tensors (fp16/bf16, head dim 64 or 128), the
C++ kernel for CPU tensors (fp32/bf16), else the PyTorch SDPA reference below (said once in the
log). `MEGATRON_SC2_ATTENTION=reference` forces the reference, e.g. to compare against it. The
kernels run as the operators `torch.ops.megatron_sc2.swa_forward/swa_backward`
(attention_ops.py), so torch.compile traces through this function without a graph break.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_sc2.ops import kernels
from megatron_sc2.ops.attention_ops import swa_forward
from megatron_sc2.ops.kernel_calls import (_CPU_DTYPES, _CUDA_DTYPES, _CUDA_HEAD_DIMS,  # noqa: F401
                                           AttentionInputError, cuda_kernel_backward,
                                           cuda_kernel_forward, key_bounds, mma_bwd_warps,
                                           mma_rows_per_warp)


def window_mask(seq: int, window: Optional[int], device: torch.device,
                document_ids: Optional[torch.Tensor] = None,
                queries: Optional[int] = None) -> torch.Tensor:
    """Boolean mask, True where query i may attend key j: i - window < j <= i (and, with
    document_ids (batch, seq), same document). `queries` (default seq): only the last that many
    positions are query rows. Shape (queries, seq), or (batch, 1, queries, seq) with documents."""
    nq = seq if queries is None else queries
    i = torch.arange(seq - nq, seq, device=device)[:, None]
    j = torch.arange(seq, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (j > i - window)
    if document_ids is not None:
        same = document_ids[:, seq - nq:, None] == document_ids[:, None, :]
        mask = (mask[None] & same)[:, None]
    return mask


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        window: Optional[int] = None, softmax_scale: Optional[float] = None,
                        document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PyTorch SDPA with an explicit boolean mask: the fallback, and what the kernels must equal.
    With fewer queries than keys they are the last positions (SDPA's own is_causal would align
    them with the first keys instead, so the mask is explicit then)."""
    h, kvh = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if window is None and document_ids is None and q.shape[1] == k.shape[1]:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=softmax_scale,
                                             enable_gqa=h != kvh)
    else:
        mask = window_mask(k.shape[1], window, q.device, document_ids, queries=q.shape[1])
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=softmax_scale,
                                             enable_gqa=h != kvh)
    return out.transpose(1, 2)


# ---- the entry point ----------------------------------------------------------------------------

def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int],
           softmax_scale: Optional[float], document_ids: Optional[torch.Tensor]) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise AttentionInputError(f"attention: {name} must be a 4-d tensor "
                                      f"(batch, seq, heads, head_dim), got {shape}")
        if not t.is_floating_point():
            raise AttentionInputError(f"attention: {name} must be floating point, got {t.dtype}")
        if t.device != q.device:
            raise AttentionInputError(f"attention: {name} is on {t.device}, q on {q.device}")
    b, s, h, d = q.shape
    if k.shape != v.shape:
        raise AttentionInputError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if (k.shape[0], k.shape[3]) != (b, d):
        raise AttentionInputError(f"attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} "
                                  "in batch or head_dim")
    sk = k.shape[1]
    if s > sk:
        raise AttentionInputError(f"attention: q has more positions ({s}) than k/v ({sk}); the "
                                  "queries must be the last positions of the key sequence")
    kvh = k.shape[2]
    if kvh == 0 or h % kvh:
        raise AttentionInputError(f"attention: query heads ({h}) must be a multiple of kv heads "
                                  f"({kvh})")
    if min(b, s, d) == 0 or h == 0:
        raise AttentionInputError(f"attention: empty input q {tuple(q.shape)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise AttentionInputError(f"attention: sliding window must be a positive int or None, "
                                  f"got {window!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float))
                                          and math.isfinite(softmax_scale)):
        raise AttentionInputError(f"attention: softmax_scale must be a finite number, "
                                  f"got {softmax_scale!r}")
    if document_ids is not None:
        if not isinstance(document_ids, torch.Tensor) or tuple(document_ids.shape) != (b, sk):
            shape = tuple(document_ids.shape) if isinstance(document_ids, torch.Tensor) else None
            raise AttentionInputError(f"attention: document_ids must have shape (batch, seq) = "
                                      f"{(b, sk)} (the key positions), got {shape}")
        if document_ids.is_floating_point() or document_ids.is_complex():
            raise AttentionInputError(f"attention: document_ids must be integers, "
                                      f"got {document_ids.dtype}")
        if document_ids.device != q.device:
            raise AttentionInputError(f"attention: document_ids on {document_ids.device}, "
                                      f"q on {q.device}")


def attention_backend(q: torch.Tensor, head_dim: Optional[int] = None) -> str:
    """Which implementation a call with q like this one uses: 'cuda', 'cpu' or 'reference'
    ('meta' on the meta device: the operators' shape-only implementation)."""
    if os.environ.get("MEGATRON_SC2_ATTENTION", "auto") == "reference":
        return "reference"
    if q.device.type == "meta":
        return "meta"
    d = q.shape[-1] if head_dim is None else head_dim
    if q.device.type == "cuda":
        mod = kernels.cuda_module()
        if mod is None:
            kernels.warn_once("cuda-missing", "attention: the CUDA kernel module is not built "
                              f"({kernels.load_error('_attn_cuda')}); using the PyTorch reference")
            return "reference"
        if q.dtype not in _CUDA_DTYPES or d not in _CUDA_HEAD_DIMS:
            kernels.warn_once(f"cuda-{q.dtype}-{d}", f"attention: no CUDA kernel for {q.dtype} "
                              f"with head dim {d}; using the PyTorch reference")
            return "reference"
        return "cuda"
    if q.device.type == "cpu":
        mod = kernels.cpu_module()
        if mod is None:
            kernels.warn_once("cpu-missing", "attention: the C++ kernel module is not built "
                              f"({kernels.load_error('_attn_cpu')}); using the PyTorch reference")
            return "reference"
        if q.dtype not in _CPU_DTYPES:
            kernels.warn_once(f"cpu-{q.dtype}", f"attention: no C++ kernel for {q.dtype}; "
                              "using the PyTorch reference")
            return "reference"
        return "cpu"
    kernels.warn_once(f"dev-{q.device.type}", f"attention: no kernel for device {q.device.type}; "
                      "using the PyTorch reference")
    return "reference"


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             window: Optional[int] = None, softmax_scale: Optional[float] = None,
                             document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal (optionally sliding-window, optionally per-document) GQA attention; see the module
    docstring. Accepts non-contiguous views and mixed dtypes; differentiable in q, k and v."""
    _check(q, k, v, window, softmax_scale, document_ids)
    # Under autocast, compute in its lower precision (as SDPA does); else in the common dtype.
    if q.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    backend = attention_backend(q)
    if backend == "reference":
        return reference_attention(q, k, v, window, softmax_scale, document_ids)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    doc = None if document_ids is None else document_ids.to(torch.int64).contiguous()
    win = 0 if window is None or window >= k.shape[1] else int(window)
    if backend == "meta":
        return swa_forward(q.contiguous(), k.contiguous(), v.contiguous(), doc, win, scale)[0]
    with torch.autocast(q.device.type, enabled=False):
        out, _ = swa_forward(q.contiguous(), k.contiguous(), v.contiguous(), doc, win, scale)
    return out
