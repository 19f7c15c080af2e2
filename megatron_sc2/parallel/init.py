"""Initialize a rank's shards of a model built on the meta device, without ever holding the
full model (3B/7B/15B on GPUs).

Each parameter's local shard is drawn from a generator seeded by (seed, parameter name, shard
offset), so replicated parameters (kv projections at TP > kv heads, LayerNorms, row-parallel
biases) come out equal on every rank that holds them and the last stage's copy of a tied
embedding equals the embedding. The distribution is the model's (reset_parameters): normal
weights, output projections scaled by 1/sqrt(2 x layers), zero biases, unit LayerNorms. It is
not the same random draw as a one-process init (small models are built whole for that).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from megatron_sc2.config import ModelConfig


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
    std = cfg.init_method_std
    out_std = std / math.sqrt(2.0 * cfg.num_layers)
    for name, p in module.named_parameters():
        local, offset = _local_and_offset(p)
        key = name
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            key = "embed_tokens.weight"
        leaf = name.rsplit(".", 1)[-1]
        if "layernorm" in name or name.startswith("norm."):
            local.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias":
            local.zero_()
        else:
            s = out_std if (".o_proj." in name or ".c_proj." in name) else std
            g = torch.Generator(device=local.device)
            g.manual_seed(zlib.crc32(f"{seed}:{key}:{offset}".encode()))
            local.normal_(0.0, s, generator=g)
