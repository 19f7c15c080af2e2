"""Model inputs from packed samples, with Megatron's `get_ltor_masks_and_position_ids` rules.

An `<|endoftext|>` token belongs to the document it ends: the next document starts right
after it. With `reset_attention_mask` the attention may not cross that boundary (expressed as
per-token document ids, which the attention entry point takes); with `reset_position_ids`
positions restart at 0 there; with `eod_mask_loss` the loss skips positions whose input token
is the end-of-document token.
"""

from __future__ import annotations

from typing import Optional

import torch


def get_batch(samples: torch.Tensor, eod: int, reset_position_ids: bool = False,
              reset_attention_mask: bool = False, eod_mask_loss: bool = False) -> dict[str, Optional[torch.Tensor]]:
    """samples (b, s+1) -> tokens, labels, loss_mask (float), position_ids, document_ids."""
    samples = samples.long()
    tokens = samples[:, :-1].contiguous()
    labels = samples[:, 1:].contiguous()
    b, s = tokens.shape
    loss_mask = torch.ones((b, s), dtype=torch.float, device=tokens.device)
    is_eod = tokens == eod
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    positions = torch.arange(s, dtype=torch.long, device=tokens.device).expand(b, s)
    document_ids = None
    if reset_position_ids or reset_attention_mask:
        # A new document starts at position i + 1 for every end-of-document token at i.
        starts = torch.zeros((b, s), dtype=torch.bool, device=tokens.device)
        starts[:, 1:] = is_eod[:, :-1]
        if reset_attention_mask:
            document_ids = torch.cumsum(starts.long(), dim=1)
        if reset_position_ids:
            start_pos = torch.where(starts, positions, torch.zeros_like(positions))
            start_pos = torch.cummax(start_pos, dim=1).values
            positions = positions - start_pos
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": positions.contiguous(),
        "document_ids": document_ids,
    }
