"""Our checkpoint (any TP/PP/DP layout) -> a Hugging Face StarCoder2 directory, streaming.

Tensors are read from DCP a few at a time, cast, checksummed and appended to the current
safetensors shard; the shard plan comes from the checkpoint metadata before any tensor is read.
Everything is written into `HF_DIR.tmp-<pid>` and renamed onto HF_DIR when it is complete and
verified.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_sc2.config import ModelConfig
from megatron_sc2.convert.dcp_io import TensorSpec, iter_model_tensors, read_model_specs
from megatron_sc2.convert.hf_config import hf_key, to_hf_config_dict
from megatron_sc2.convert.hf_dir import INDEX_FILE
from megatron_sc2.convert.layout import check_names_and_shapes
from megatron_sc2.convert.progress import progress_bar
from megatron_sc2.convert.safetensors_io import ShardWriter
from megatron_sc2.convert.tokenizer_files import write_generation_config, write_tokenizer
from megatron_sc2.convert.verify import check_read_back, checksum, verify_logits
from megatron_sc2.errors import CheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class ToHFOptions:
    load: Path
    save: Path
    iteration: Optional[int] = None
    dtype: Optional[str] = None  # None: the dtype the checkpoint stores
    max_shard_size: int = 5_000_000_000
    tokenizer: Optional[str] = None  # None: the one named in meta.json
    verify_logits: bool = False
    force: bool = False
    progress: Optional[bool] = None  # None: when stderr is a terminal


@dataclass
class ToHFResult:
    checkpoint: Path
    out_dir: Path
    num_tensors: int
    total_bytes: int
    shards: list[str]
    seconds: float
    tokenizer: Optional[str]
    logits_max_diff: Optional[float] = None


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors per shard, each shard at most max_bytes (a larger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _model_config(meta: dict, ckpt: Path) -> ModelConfig:
    try:
        return ModelConfig(**meta["model_config"]).validate()
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt}/meta.json: no usable model_config ({e})") from None


EXPORT_MARKER = ".megatron-sc2-export"  # written into every export: "we made this directory"


_EXPORT_FILES = ("*.safetensors", "*.json", "merges.txt", "vocab.json", "tokenizer.model", EXPORT_MARKER)


def _is_previous_export(d: Path) -> bool:
    """A directory we wrote ourselves (it holds our marker file) and nothing added since:
    replacing it is what re-running an export means. Anything else needs --force."""
    marker = d / EXPORT_MARKER
    if not marker.is_file() or marker.is_symlink():
        return False
    return all(f.is_file() and not f.is_symlink() and any(f.match(p) for p in _EXPORT_FILES)
               for f in d.iterdir())


def refuse_overlap(load: Path, save: Path, load_flag: str = "--load", save_flag: str = "--save") -> None:
    """Writing (and replacing) `save` must never touch what `load` reads: the same directory,
    one inside the other, either way, is refused whatever --force says."""
    a, b = Path(load).resolve(), Path(save).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise CheckpointError(f"{save_flag} {save} and {load_flag} {load} overlap (the same directory or one "
                              f"inside the other); the output would replace what is read: pick another {save_flag}")


def prepare_out_dir(final: Path, force: bool) -> Path:
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise CheckpointError(f"--save {final}: exists and is not a directory (a file or a link)")
    if final.exists() and any(final.iterdir()):
        if not force and not _is_previous_export(final):
            raise CheckpointError(
                f"--save {final}: already exists and was not written by `convert to-hf` (no {EXPORT_MARKER} "
                f"marker); pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():
        trash = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink()
    else:
        os.replace(tmp, final)


def to_hf(opts: ToHFOptions) -> ToHFResult:
    from megatron_sc2.training.checkpoint import find_checkpoint, read_meta, tokenizer_path

    t0 = time.perf_counter()
    ckpt = find_checkpoint(opts.load, opts.iteration)
    meta = read_meta(ckpt)
    cfg = _model_config(meta, ckpt)
    stored = read_model_specs(ckpt)
    order = check_names_and_shapes({n: s.shape for n, s in stored.items()}, cfg, str(ckpt))
    for n in order:
        if not stored[n].dtype.is_floating_point:
            raise CheckpointError(f"{ckpt}: tensor {n} has non-float dtype {stored[n].dtype}")
    if opts.dtype is None:
        kinds = {stored[n].dtype for n in order}
        out_dtype = torch.float32 if len(kinds) > 1 else kinds.pop()
    else:
        out_dtype = DTYPES[opts.dtype]
    out_specs = [TensorSpec(n, stored[n].shape, out_dtype) for n in order]
    shards = plan_shards(out_specs, opts.max_shard_size)
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    tokenizer = opts.tokenizer or tokenizer_path(ckpt, meta)

    final = Path(opts.save)
    refuse_overlap(Path(opts.load), final)
    refuse_overlap(ckpt, final)
    tmp = prepare_out_dir(final, opts.force)
    try:
        # Tokenizer first: a wrong one is refused before the weights are converted.
        if tokenizer:
            write_tokenizer(tokenizer, tmp, cfg)
        write_generation_config(tmp, cfg)
        sums: dict[str, int] = {}
        total = sum(s.nbytes for s in out_specs)
        source = iter_model_tensors(ckpt, [stored[n] for n in order], dtype=out_dtype)
        with progress_bar(total, "to-hf", opts.progress) as bar:
            for shard, fname in zip(shards, names):
                writer = ShardWriter(tmp / fname, [(hf_key(s.name), s.shape, s.dtype) for s in shard],
                                     metadata={"format": "pt"})
                try:
                    for spec in shard:
                        name, t = next(source)
                        assert name == spec.name
                        assert t.dtype == out_dtype and t.is_contiguous()
                        sums[hf_key(name)] = checksum(t)
                        writer.write(hf_key(name), t)
                        bar.update(spec.nbytes)
                        del t
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
        weight_map = {hf_key(s.name): fname for shard, fname in zip(shards, names) for s in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(
            json.dumps(to_hf_config_dict(cfg, HF_DTYPE_NAMES[out_dtype]), indent=2) + "\n")
        (tmp / EXPORT_MARKER).write_text(f"{ckpt}\n")
        verify_shards(tmp, {hf_key(s.name): s for s in out_specs}, weight_map, sums)
        diff = None
        if opts.verify_logits:
            diff = verify_logits(ckpt, tmp, cfg, round_to=out_dtype if out_dtype != torch.float32 else None)
        move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ToHFResult(ckpt, final, len(out_specs), total, names, time.perf_counter() - t0,
                      str(tokenizer) if tokenizer else None, diff)


def verify_shards(out_dir: Path, specs: dict[str, TensorSpec], weight_map: dict[str, str],
                  sums: dict[str, int]) -> None:
    """Reopen every shard with the safetensors library and compare names, shapes, dtypes and
    the CRC-32 of each tensor's bytes with what was written."""
    from safetensors import safe_open

    seen: set[str] = set()
    for fname in sorted(set(weight_map.values())):
        with safe_open(str(out_dir / fname), framework="pt") as f:
            for key in f.keys():
                if weight_map.get(key) != fname:
                    raise CheckpointError(f"verify: {fname} holds {key}, which the index does not place there")
                t = f.get_tensor(key)
                spec = specs[key]
                check_read_back(key, t, spec.shape, spec.dtype, sums[key], fname)
                seen.add(key)
                del t
    if seen != set(specs):
        raise CheckpointError(f"verify: tensors missing from the shards: {sorted(set(specs) - seen)[:3]}")
