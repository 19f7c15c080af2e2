"""Initialize a rank's shards of a model built on the meta device, without ever holding the
full model (3B/7B/15B on GPUs).

Each parameter's local shard is drawn from a generator seeded by (seed, parameter name, shard
offset), so replicated parameters (kv projections at TP > kv heads, LayerNorms, row-parallel
biases) come out equal on every rank that holds them and the last stage's copy of a tied
embedding equals the embedding. The rule is the model's own (`init_parameter`); only the random
draw differs from a one-process init (small models are built whole for that).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from megatron_sc2.config import ModelConfig
from megatron_sc2.model.starcoder2 import init_parameter


def _local_and_offset(p: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    if isinstance(p, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return p.to_local(), tuple(offset)
    return p, (0,) * p.ndim


@torch.no_grad()
def materialize(module: nn.Module, cfg: ModelConfig, device: torch.device, seed: int) -> None:
    """Allocate `module`'s meta parameters on `device` and initialize each shard."""
    module.to_empty(device=device)
    for name, p in module.named_parameters():
        local, offset = _local_and_offset(p)
        key = name
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            key = "embed_tokens.weight"
        g = torch.Generator(device=local.device)
        g.manual_seed(zlib.crc32(f"{seed}:{key}:{offset}".encode()))
        init_parameter(name, local, cfg, generator=g)
