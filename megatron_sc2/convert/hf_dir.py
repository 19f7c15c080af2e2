"""A Hugging Face StarCoder2 directory: its config, and where each tensor sits in which shard.

Only headers are read here; tensors are read one at a time later. Everything a conversion could
trip over (not StarCoder2, shards listed but missing, names or shapes that do not fit the
config) is refused here, before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_sc2.config import ModelConfig
from megatron_sc2.convert.hf_config import from_hf_config_dict, hf_key, our_key
from megatron_sc2.convert.layout import check_names_and_shapes
from megatron_sc2.convert.safetensors_io import TensorEntry, read_header
from megatron_sc2.errors import CheckpointError, ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")


@dataclass
class HFSource:
    root: Path
    config: dict
    model_config: ModelConfig
    # our name -> (shard path, entry), in the model's order
    tensors: dict[str, tuple[Path, TensorEntry]]

    def dtypes(self) -> set[torch.dtype]:
        return {e.dtype for _, e in self.tensors.values()}


def read_weight_map(root: Path) -> Optional[dict[str, str]]:
    """The index file's weight name -> shard file map, or None when there is no index."""
    index = root / INDEX_FILE
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None


def _shard_files(root: Path) -> list[Path]:
    weight_map = read_weight_map(root)
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{root}: missing shard(s) {', '.join(missing)} listed in {INDEX_FILE}")
        return [root / f for f in files]
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    if any(root.glob("pytorch_model*.bin")):
        raise CheckpointError(f"{root}: only safetensors weights are supported (found pytorch_model*.bin)")
    raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}")


def open_hf_dir(path: str | Path) -> HFSource:
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"Hugging Face directory not found: {root}")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: no config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if config.get("model_type") != "starcoder2":
        raise CheckpointError(
            f"{cfg_path}: not a StarCoder2 model (model_type={config.get('model_type')!r}, "
            f"architectures={config.get('architectures')})")
    try:
        model_config = from_hf_config_dict(config)
    except KeyError as e:
        raise CheckpointError(f"{cfg_path}: missing field {e}") from None
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    tensors: dict[str, tuple[Path, TensorEntry]] = {}
    for shard in _shard_files(root):
        for name, entry in read_header(shard).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some old exports carry; recomputed from rope_theta
            ours = our_key(name)
            if ours in tensors:
                raise CheckpointError(f"{root}: tensor {name} appears in two shards")
            tensors[ours] = (shard, entry)
    found = {n: e.shape for n, (_, e) in tensors.items()}
    order = check_names_and_shapes(found, model_config, str(root), display=hf_key)
    return HFSource(root, config, model_config, {n: tensors[n] for n in order})
