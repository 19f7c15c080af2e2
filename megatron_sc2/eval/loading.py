"""The model and tokenizer an evaluation runs: from our checkpoint (any layout it was saved
under: DCP stores global tensors) or from a Hugging Face directory (read by the converter's
reader, no conversion written to disk)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_sc2.config import ModelConfig
from megatron_sc2.errors import CheckpointError, ConfigError


@dataclass
class Loaded:
    model: "torch.nn.Module"
    cfg: ModelConfig
    tokenizer: Optional[str]   # path of the tokenizer the checkpoint names, if any
    source: str                # "checkpoint" | "hf"
    path: Path


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_for_eval(path: str | Path, dtype: torch.dtype = torch.float32) -> Loaded:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--load: {path} does not exist")
    if is_hf_dir(path):
        loaded = _load_hf(path)
    else:
        loaded = _load_checkpoint(path)
    loaded.model.to(dtype).eval()
    return loaded


def _load_checkpoint(path: Path) -> Loaded:
    from megatron_sc2.convert.verify import load_our_model
    from megatron_sc2.training.checkpoint import find_checkpoint, read_meta

    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    try:
        cfg = ModelConfig(**meta["model_config"]).validate()
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt}/meta.json: no usable model_config ({e})") from None
    model = load_our_model(ckpt, cfg)
    tok = meta.get("tokenizer")
    return Loaded(model, cfg, str(tok) if tok else None, "checkpoint", ckpt)


def _load_hf(path: Path) -> Loaded:
    from megatron_sc2.convert.hf_dir import open_hf_dir
    from megatron_sc2.convert.layout import TIED_HEAD
    from megatron_sc2.convert.safetensors_io import read_tensor
    from megatron_sc2.model import StarCoder2

    src = open_hf_dir(path)
    cfg = src.model_config
    model = StarCoder2(cfg)
    params = dict(model.state_dict())
    files = {}
    try:
        for name, (shard, entry) in src.tensors.items():
            if name == TIED_HEAD and cfg.tie_word_embeddings:
                continue
            f = files.get(shard)
            if f is None:
                f = files[shard] = open(shard, "rb")
            with torch.no_grad():
                params[name].copy_(read_tensor(f, entry))
    finally:
        for f in files.values():
            f.close()
    tok = path if (path / "tokenizer.json").is_file() else None
    return Loaded(model, cfg, str(tok) if tok else None, "hf", path)


def load_eval_tokenizer(loaded: Loaded, override: Optional[str], need_fim: bool = True):
    """Our tokenizer for the model: --tokenizer, else the one the checkpoint records; refused
    when there is none or when its ids do not fit the model's vocabulary."""
    from megatron_sc2.data.tokenizer import load_tokenizer

    where = override or loaded.tokenizer
    if not where:
        raise ConfigError(f"{loaded.path} records no tokenizer; pass --tokenizer PATH "
                          f"(a tokenizer.json or HF tokenizer directory)")
    if not Path(where).exists():
        raise ConfigError(f"tokenizer {where} (named by {'--tokenizer' if override else loaded.path}) does not exist")
    tok = load_tokenizer(where)
    if tok.vocab_size > loaded.cfg.vocab_size:
        raise ConfigError(f"tokenizer {where} has {tok.vocab_size} tokens but the model's vocabulary "
                          f"has {loaded.cfg.vocab_size}: wrong --tokenizer?")
    for name in ("<fim_prefix>", "<fim_middle>", "<fim_suffix>") if need_fim else ():
        if tok.token_to_id(name) is None:
            raise ConfigError(f"tokenizer {where} has no {name} token: infilling tasks cannot be prompted")
    return tok
