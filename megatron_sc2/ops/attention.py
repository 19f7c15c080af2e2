"""Sliding-window grouped-query attention.

`sliding_window_attention(q, k, v, window=None, softmax_scale=None, document_ids=None)`:
q (batch, seq, heads, head_dim), k/v (batch, seq, kv_heads, head_dim) -> (batch, seq, heads,
head_dim). Query i sees keys i - window < j <= i (window=None: plain causal); with
`document_ids` (batch, seq) it also sees only keys of its own document.

This reference uses PyTorch SDPA with an explicit boolean mask; our own kernels replace it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def window_mask(seq: int, window: Optional[int], device: torch.device,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask, True where query i may attend key j: i - window < j <= i (and, with
    document_ids, same document). Shape (seq, seq), or (batch, 1, seq, seq) with documents."""
    i = torch.arange(seq, device=device)[:, None]
    j = torch.arange(seq, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (j > i - window)
    if document_ids is not None:
        same = document_ids[:, :, None] == document_ids[:, None, :]
        mask = (mask[None] & same)[:, None]
    return mask


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             window: Optional[int] = None, softmax_scale: Optional[float] = None,
                             document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    b, s, h, d = q.shape
    kvh = k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kvh})")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if window is None and document_ids is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=softmax_scale,
                                             enable_gqa=h != kvh)
    else:
        mask = window_mask(s, window, q.device, document_ids)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=softmax_scale,
                                             enable_gqa=h != kvh)
    return out.transpose(1, 2)
