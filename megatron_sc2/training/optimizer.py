"""AdamW with Megatron's parameter groups and its warmup-then-decay learning-rate schedule."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from megatron_sc2.config import TrainConfig


def parameter_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Biases and LayerNorm parameters (every 1-D tensor) get no weight decay, as in Megatron."""
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(modules: Iterable[nn.Module], cfg: TrainConfig) -> torch.optim.AdamW:
    named: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for m in modules:
        for name, p in m.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                named.append((name, p))
    return torch.optim.AdamW(parameter_groups(named, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             foreach=False)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """LR for 0-based `step`: linear warmup to `lr` over lr_warmup_iters (the first step already
    gets lr/warmup, not 0), then cosine/linear decay to min_lr at lr_decay_iters, then min_lr."""
    warmup = cfg.lr_warmup_iters
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    decay_iters = cfg.lr_decay_iters or cfg.train_iters
    if step >= decay_iters:
        return cfg.min_lr
    span = max(decay_iters - warmup, 1)
    progress = (step - warmup) / span
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
