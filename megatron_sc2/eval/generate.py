"""Generation from our StarCoder2 with a key/value cache that keeps only the sliding window.

A query at position i sees keys i - w < j <= i, so each layer needs only the last w keys and
values: a ring buffer of w slots, slot = column % w, overwritten as decoding moves on (memory
w instead of the whole sequence). Prompts are batched with left padding: row r's pad columns
are masked out and its positions start at 0 on its first real token, so every row computes
what it would alone.

The model file has no inference path; this module runs the model's own submodules (embedding,
each block's norms, projections and MLP, the model's rotary helper) layer by layer. The
prompt goes through once with our attention kernel (padding expressed as document ids); each
new token then attends to its layer's ring (two batched matmuls, grouped by kv head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_sc2.errors import ConfigError
from megatron_sc2.model.starcoder2 import StarCoder2, apply_rotary, rotary_cos_sin
from megatron_sc2.ops import sliding_window_attention


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()    # a row ends after generating one of these
    pad_id: int = 0                   # what a finished row emits (as transformers does)

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        return self


@dataclass
class WindowKVCache:
    """Per layer, keys and values of the last `size` columns: (batch, kv_heads, size, head_dim)
    tensors written at slot = column % size; `columns[s]` is the column slot s holds (-1: none)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    columns: torch.Tensor
    size: int

    @classmethod
    def empty(cls, layers: int, batch: int, kv_heads: int, size: int, head_dim: int,
              dtype: torch.dtype, device: torch.device) -> "WindowKVCache":
        shape = (batch, kv_heads, size, head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                   torch.full((size,), -1, dtype=torch.long, device=device), size)

    def store_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (batch, seq, kv_heads, head_dim) for columns 0..seq-1; keeps the last `size`."""
        s = k.shape[1]
        first = max(0, s - self.size)
        cols = torch.arange(first, s, device=k.device)
        slots = cols % self.size
        self.k[layer][:, :, slots] = k[:, first:].transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][:, :, slots] = v[:, first:].transpose(1, 2).to(self.v[layer].dtype)
        if layer == 0:
            self.columns[slots] = cols

    def store_token(self, layer: int, k: torch.Tensor, v: torch.Tensor, column: int) -> None:
        """k, v: (batch, 1, kv_heads, head_dim) of one new column."""
        slot = column % self.size
        self.k[layer][:, :, slot] = k[:, 0].to(self.k[layer].dtype)
        self.v[layer][:, :, slot] = v[:, 0].to(self.v[layer].dtype)
        if layer == 0:
            self.columns[slot] = column

    def mask(self, pad: torch.Tensor) -> torch.Tensor:
        """(batch, 1, 1, size) bool: slots holding a real (non-pad) column of each row."""
        ok = (self.columns[None, :] >= pad[:, None]) & (self.columns[None, :] >= 0)
        return ok[:, None, None, :]


def _layer_qkv(block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    attn = block.self_attn
    b, s, _ = x.shape
    h = block.input_layernorm(x)
    q = attn.q_proj(h).view(b, s, -1, attn.head_dim)
    k = attn.k_proj(h).view(b, s, -1, attn.head_dim)
    v = attn.v_proj(h).view(b, s, -1, attn.head_dim)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def _finish_layer(block, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    b, s = x.shape[:2]
    x = x + block.self_attn.o_proj(attn_out.reshape(b, s, -1))
    return x + block.mlp(block.post_attention_layernorm(x))


def _head(model: StarCoder2, h: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.norm(h)).float()


@torch.no_grad()
def prefill(model: StarCoder2, tokens: torch.Tensor, pad: torch.Tensor,
            cache: WindowKVCache) -> torch.Tensor:
    """Run the left-padded prompts (batch, seq) once, fill the cache; logits of the last column."""
    b, s = tokens.shape
    cols = torch.arange(s, device=tokens.device)
    positions = (cols[None, :] - pad[:, None]).clamp(min=0)
    docs = (cols[None, :] >= pad[:, None]).to(torch.int64)  # pads: document 0, prompt: 1
    h = model.embed_tokens(tokens)
    cos, sin = rotary_cos_sin(positions, model.cfg.head_dim, model.cfg.rope_theta, dtype=h.dtype)
    for i, block in enumerate(model.layers.values()):
        q, k, v = _layer_qkv(block, h, cos, sin)
        cache.store_prompt(i, k, v)
        out = sliding_window_attention(q, k, v, window=block.self_attn.window, document_ids=docs)
        h = _finish_layer(block, h, out)
    return _head(model, h[:, -1:])[:, 0]


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One query per row against its layer's cache, grouped-query: q (b, 1, H, d), k/v (b, KV, S, d),
    bias (b * KV, 1, S) additive mask (0 or -inf) -> (b, 1, H, d). Query heads g*H/KV ...
    (g+1)*H/KV-1 share kv head g. Three batched ops (scaled scores with the mask added, softmax,
    weighted sum): SDPA's CPU path costs several times more for a single query."""
    b, _, heads, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    qg = q.reshape(b * kv, heads // kv, d)
    scores = torch.baddbmm(bias, qg, k.reshape(b * kv, s, d).transpose(1, 2), alpha=1.0 / math.sqrt(d))
    out = torch.bmm(torch.softmax(scores, dim=-1), v.reshape(b * kv, s, d))  # (b*KV, G, d)
    return out.reshape(b, 1, heads, d)


@torch.no_grad()
def decode_step(model: StarCoder2, token: torch.Tensor, position: torch.Tensor, column: int,
                pad: torch.Tensor, cache: WindowKVCache) -> torch.Tensor:
    """One new token per row (batch,) at `column`; returns logits (batch, vocab)."""
    h = model.embed_tokens(token[:, None])
    cos, sin = rotary_cos_sin(position[:, None], model.cfg.head_dim, model.cfg.rope_theta, dtype=h.dtype)
    # Until the ring wraps, slots 0..column hold columns 0..column: attend to those only.
    used = min(column + 1, cache.size)
    bias = None
    for i, block in enumerate(model.layers.values()):
        q, k, v = _layer_qkv(block, h, cos, sin)
        cache.store_token(i, k, v, column)
        if bias is None:  # after layer 0 has written this column's slot
            ok = cache.mask(pad)[:, 0, :, :used]  # (b, 1, used)
            bias = torch.zeros(ok.shape, dtype=h.dtype, device=h.device).masked_fill_(~ok, float("-inf"))
            bias = bias.repeat_interleave(cache.k[i].shape[1], dim=0)  # (b * KV, 1, used)
        out = _decode_attention(q, cache.k[i][:, :, :used], cache.v[i][:, :, :used], bias)
        h = _finish_layer(block, h, out)
    return _head(model, h)[:, 0]


def choose(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Greedy at temperature 0, else temperature-scaled nucleus (top-p) sampling."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop = cum - sorted_p > params.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def cache_size(model: StarCoder2, total_columns: int) -> int:
    w = model.cfg.sliding_window
    return min(int(w), total_columns) if w else total_columns


@torch.no_grad()
def generate(model: StarCoder2, prompts: Sequence[Sequence[int]], params: SamplingParams,
             should_stop: Optional[Callable[[int, list[int]], bool]] = None,
             check_every: int = 8) -> list[list[int]]:
    """New token ids for each prompt (stop token included, nothing after it). `should_stop(row,
    ids)` may end a row early (text stop sequences); it is asked every `check_every` steps."""
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generate: every prompt needs at least one token")
    vocab = model.cfg.vocab_size
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise ConfigError(f"generate: prompt token ids must be in [0, {vocab}) (tokenizer larger than the model?)")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    b, s = len(prompts), max(len(p) for p in prompts)
    if s + params.max_new_tokens > model.cfg.max_position_embeddings:
        raise ConfigError(f"prompt ({s} tokens) + --max-new-tokens {params.max_new_tokens} exceeds the "
                          f"model's context of {model.cfg.max_position_embeddings}")
    pad = torch.tensor([s - len(p) for p in prompts], device=device)
    tokens = torch.full((b, s), params.pad_id, dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        tokens[r, s - len(p):] = torch.tensor(list(p), dtype=torch.long)
    cfg = model.cfg
    cache = WindowKVCache.empty(len(model.layers), b, cfg.num_query_groups, cache_size(model, s + params.max_new_tokens),
                                cfg.head_dim, dtype, device)
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.temperature > 0 else None
    stop = torch.tensor(list(params.stop_ids) or [-1], device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    lengths: list[Optional[int]] = [None] * b
    out: list[torch.Tensor] = []
    logits = prefill(model, tokens, pad, cache)
    for step in range(params.max_new_tokens):
        nxt = choose(logits, params, gen)
        nxt = torch.where(done, torch.full_like(nxt, params.pad_id), nxt)
        out.append(nxt)
        done |= torch.isin(nxt, stop)
        if should_stop is not None and (step + 1) % check_every == 0:
            ids = torch.stack(out, 1).tolist()
            for r in range(b):
                if not done[r] and should_stop(r, ids[r]):
                    done[r] = True
                    lengths[r] = step + 1
        if bool(done.all()) or step + 1 == params.max_new_tokens:
            break
        column = s + step
        logits = decode_step(model, nxt, column - pad, column, pad, cache)
    ids = torch.stack(out, 1).tolist()
    return [_trim(row[:n], params.stop_ids) for row, n in zip(ids, lengths)]


def _trim(row: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    """The row up to and including its first stop token."""
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[:i + 1]
    return row
