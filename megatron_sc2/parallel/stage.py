"""A pipeline stage: a slice of StarCoder2's layers, with the embedding on the first stage and
the final norm and lm_head on the last.

The stage holds the model's own submodules under the model's own names (`embed_tokens`,
`layers.{global index}`, `norm`, `lm_head`), so its state dict keys are the single-process
ones and checkpoints load under any layout. It runs the blocks itself (instead of the model's
forward) so that rotary positions come from the full sequence length even when the residual
stream holds a sequence shard, and so activation checkpointing wraps whole blocks (full) or
the attention sub-block (selective) without renaming any parameter.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_sc2.config import ModelConfig
from megatron_sc2.model.starcoder2 import TransformerBlock, rotary_cos_sin


class StageModule(nn.Module):
    def __init__(self, cfg: ModelConfig, embed_tokens: Optional[nn.Embedding],
                 layers: dict[str, TransformerBlock], norm: Optional[nn.LayerNorm],
                 lm_head: Optional[nn.Linear], seq_shards: int = 1,
                 recompute: Optional[str] = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleDict(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.seq_shards = seq_shards  # tensor-parallel size under sequence parallelism, else 1
        self.recompute = recompute

    @property
    def is_first(self) -> bool:
        return self.embed_tokens is not None

    @property
    def is_last(self) -> bool:
        return self.lm_head is not None

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: token ids (batch, seq) on the first stage, else hidden states (batch, seq /
        seq_shards, hidden). Returns hidden states, or vocabulary(-shard) logits on the last.
        position_ids / document_ids (batch, seq) cover the full sequence."""
        if self.embed_tokens is not None:
            seq = x.shape[1]
            h = self.embed_tokens(x)
        else:
            seq = x.shape[1] * self.seq_shards
            h = x
        if position_ids is None:
            position_ids = torch.arange(seq, device=h.device).unsqueeze(0).expand(h.shape[0], seq)
        cos, sin = rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, dtype=h.dtype)
        for layer in self.layers.values():
            h = self._block(layer, h, cos, sin, document_ids)
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        return h

    def _block(self, layer: TransformerBlock, h: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, docs: Optional[torch.Tensor]) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(layer, h, cos, sin, docs, use_reentrant=False)
        if self.recompute == "selective" and torch.is_grad_enabled():
            def attention(x: torch.Tensor) -> torch.Tensor:
                return layer.self_attn(layer.input_layernorm(x), cos, sin, docs)
            h = h + checkpoint(attention, h, use_reentrant=False)
            return h + layer.mlp(layer.post_attention_layernorm(h))
        return layer(h, cos, sin, docs)


class RankModel(nn.Module):
    """Everything one rank holds (all its model chunks), under the model's names: one place
    for the optimizer's parameters and for state dicts."""

    def __init__(self, chunks: list[StageModule]):
        super().__init__()
        layers: dict[str, nn.Module] = {}
        for chunk in chunks:
            layers.update(chunk.layers.items())
        self.embed_tokens = next((c.embed_tokens for c in chunks if c.embed_tokens is not None), None)
        self.layers = nn.ModuleDict(dict(sorted(layers.items(), key=lambda kv: int(kv[0]))))
        self.norm = next((c.norm for c in chunks if c.norm is not None), None)
        self.lm_head = next((c.lm_head for c in chunks if c.lm_head is not None), None)
