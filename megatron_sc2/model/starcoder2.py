"""StarCoder2, read top to bottom like the paper.

tokens -> embedding -> N x [x + attn(LN(x)); x + mlp(LN(x))] -> LN -> lm_head.

Attention is grouped-query with rotary embeddings on the full head dim and a sliding window
(query i sees keys i - w < j <= i); the MLP is c_proj(gelu_tanh(c_fc(x))); every linear has a
bias except lm_head; LayerNorms have a bias. The submodule names equal the Hugging Face ones
(without the `model.` prefix) so that state dicts map one to one.

Parallelism and activation recomputation are applied from outside (megatron_sc2.parallel):
`layers` is a ModuleDict keyed by the global layer index, so a pipeline stage is this model
with some layers deleted and `embed_tokens`/`norm`/`lm_head` set to None where the stage does
not own them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_sc2.config import ModelConfig
from megatron_sc2.ops import sliding_window_attention
from megatron_sc2.ops.linear import Linear


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (batch, seq, head_dim) for rotate-half RoPE, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (b, s, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and a sliding window."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_query_groups
        self.head_dim = cfg.head_dim
        self.window = cfg.sliding_window
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.use_bias)
        self.k_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.use_bias)
        self.v_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.use_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.use_bias)
        # None: our kernel entry point. Context parallelism (megatron_sc2.parallel) sets one that
        # first fetches the keys and values before this rank's chunk of the sequence.
        self.core_attention: Optional[Callable[..., torch.Tensor]] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 instead of the head count: a tensor-parallel plan shards the projections, and then
        # each rank holds a slice of the heads.
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attend = self.core_attention or sliding_window_attention
        out = attend(q, k, v, window=self.window, document_ids=document_ids)
        return self.o_proj(out.reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=cfg.use_bias)
        self.c_proj = Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_epsilon)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, document_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


@torch.no_grad()
def init_parameter(name: str, t: torch.Tensor, cfg: ModelConfig,
                   generator: Optional[torch.Generator] = None) -> None:
    """The one initialization rule, by parameter name (the model and shard-by-shard init in
    megatron_sc2.parallel use it): unit LayerNorm weights, zero biases, Normal(0, std) weights,
    the output projection of each residual branch scaled by 1/sqrt(2 * layers) (Megatron, GPT-2)."""
    leaf = name.rsplit(".", 1)[-1]
    if "layernorm" in name or name.startswith("norm."):
        t.fill_(1.0 if leaf == "weight" else 0.0)
    elif leaf == "bias":
        t.zero_()
    else:
        out = ".o_proj." in name or ".c_proj." in name
        std = cfg.init_method_std / (math.sqrt(2.0 * cfg.num_layers) if out else 1.0)
        t.normal_(0.0, std, generator=generator)


class StarCoder2(nn.Module):
    """The causal language model. `forward` returns logits (batch, seq, vocab); the loss is
    computed by the caller (so a tensor-parallel caller can use a vocabulary-parallel loss)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.num_layers)})
        self.norm: Optional[nn.LayerNorm] = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_epsilon)
        self.lm_head: Optional[nn.Linear] = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.device.type != "meta":
                init_parameter(name, p, self.cfg)

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens: (batch, seq) ids, or hidden states (batch, seq, hidden) on a pipeline stage
        without the embedding. position_ids default to 0..seq-1; document_ids (batch, seq), if
        given, keep attention inside each document of a packed sample."""
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        b, s = h.shape[0], h.shape[1]
        if position_ids is None:
            position_ids = torch.arange(s, device=h.device).unsqueeze(0).expand(b, s)
        cos, sin = rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, dtype=h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin, document_ids)
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        return h
