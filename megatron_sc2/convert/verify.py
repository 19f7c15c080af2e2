"""Checks run after a conversion wrote its output: per-tensor checksums and, on request, logits.

The checksum (CRC-32 of the exact bytes) is taken while writing and again from what an
independent reader gets back from disk (the `safetensors` library for HF shards, DCP for our
checkpoints). `--verify-logits` runs our model on the checkpoint and transformers'
Starcoder2ForCausalLM on the HF directory on the same tokens (both fp32, weights rounded to the
stored dtype) and compares the logits; both models load one decoder layer at a time
(streamed_models), so this fits in memory for 3B and 15B models.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Optional

import torch

from megatron_sc2.config import ModelConfig
from megatron_sc2.convert.dcp_io import iter_model_tensors, read_model_specs
from megatron_sc2.convert.layout import TIED_HEAD
from megatron_sc2.convert.safetensors_io import tensor_bytes
from megatron_sc2.convert.streamed_models import stream_hf_model, stream_our_model
from megatron_sc2.errors import CheckpointError

LOGITS_ATOL = 1e-4


def checksum(t: torch.Tensor) -> int:
    return zlib.crc32(tensor_bytes(t))


def check_read_back(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype,
                    expected_sum: int, where: object) -> None:
    """A tensor read back after writing must have the written shape, dtype and checksum."""
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise CheckpointError(f"verify: {name} reads back as {tuple(t.shape)} {t.dtype}, "
                              f"wrote {tuple(shape)} {dtype}")
    if checksum(t) != expected_sum:
        raise CheckpointError(f"verify: checksum of {name} in {where} differs from what was written")


def load_our_model(ckpt: Path, cfg: ModelConfig, round_to: Optional[torch.dtype] = None):
    """Our whole StarCoder2 in fp32 with the checkpoint's weights (rounded through `round_to`);
    for small models (tests, the benchmark's baseline). --verify-logits streams instead."""
    from megatron_sc2.model import StarCoder2

    model = StarCoder2(cfg).eval()
    params = dict(model.state_dict())
    specs = read_model_specs(ckpt)
    for name, t in iter_model_tensors(ckpt, list(specs.values())):
        if name == TIED_HEAD and cfg.tie_word_embeddings:
            continue
        if round_to is not None:
            t = t.to(round_to)
        params[name].copy_(t)
    return model


def max_logit_diff(ours, hf, cfg: ModelConfig, seq_len: Optional[int] = None, seed: int = 0) -> float:
    """Max |ours - hf| over logits of random tokens; the sequence is longer than a small window."""
    if seq_len is None:
        seq_len = min(cfg.max_position_embeddings, 96)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=g)
    with torch.no_grad():
        a = ours(tokens)
        b = hf(tokens).logits
    if a.shape != b.shape:
        raise CheckpointError(f"logits shapes differ: ours {tuple(a.shape)} vs transformers {tuple(b.shape)}")
    return (a - b).abs().max().item()


def verify_logits(ckpt: Path, hf_dir: Path, cfg: ModelConfig, round_to: Optional[torch.dtype]) -> float:
    """Max logit difference between our model on `ckpt` and transformers' on `hf_dir`; refused
    above LOGITS_ATOL. Peak memory: both embeddings / heads plus about one decoder layer."""
    ours = stream_our_model(Path(ckpt), cfg, round_to)
    hf = stream_hf_model(Path(hf_dir), round_to)
    diff = max_logit_diff(ours, hf, cfg)
    if not diff <= LOGITS_ATOL:
        raise CheckpointError(
            f"--verify-logits: logits of {ckpt} and {hf_dir} differ by {diff:.3g} (> {LOGITS_ATOL})")
    return diff
