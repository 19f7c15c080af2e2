"""Activation recomputation (`--recompute-granularity full|selective`), wrapped around the
model's blocks from outside, in one process as under any parallel layout.

full: each transformer block keeps only its input and is recomputed in backward; selective:
only the attention sub-block is (Megatron's cheap-to-recompute, memory-hungry part). The
block's own forward is wrapped in place (no wrapper module), so parameter names, state dicts
and checkpoints are unchanged. Apply before data-parallel wrapping (FSDP's hooks then sit
outside the recomputed region, as torchtitan does it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _recompute_forward(module: nn.Module) -> None:
    inner = module.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)
    module.forward = forward


def apply_recompute(model: nn.Module, granularity: Optional[str]) -> None:
    """Recompute `model.layers` (a StarCoder2 or a pipeline stage of it) in backward."""
    if granularity is None:
        return
    if granularity not in ("full", "selective"):
        raise ValueError(f"recompute granularity must be full or selective, got {granularity!r}")
    for block in model.layers.values():
        _recompute_forward(block if granularity == "full" else block.self_attn)
