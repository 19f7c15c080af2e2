"""A Hugging Face StarCoder2 directory -> our model-only checkpoint at iteration 0, streaming.

The checkpoint holds {"model": ...} only and meta.json says `has_optimizer: false`, so
`megatron-sc2 train --load CKPT` starts a fresh optimizer and step counter (finetune-style).
DCP stores global tensors, so one checkpoint serves every TP/PP layout; the parallel sizes
given here are only checked against the model so that a layout that cannot work is refused now.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron_sc2.config import ModelConfig
from megatron_sc2.convert.dcp_io import TensorSpec, iter_own_files_mmap, save_model_streaming
from megatron_sc2.convert.hf_dir import TOKENIZER_FILES, HFSource, open_hf_dir
from megatron_sc2.convert.progress import progress_bar
from megatron_sc2.convert.safetensors_io import read_tensor
from megatron_sc2.convert.to_hf import DTYPES
from megatron_sc2.convert.verify import check_read_back, checksum, verify_logits
from megatron_sc2.errors import CheckpointError, ConfigError

ITERATION = 0
TOKENIZER_SUBDIR = "tokenizer"


@dataclass
class FromHFOptions:
    load: Path
    save: Path
    dtype: Optional[str] = None  # None: keep the dtype of the HF shards
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    verify_logits: bool = False
    progress: Optional[bool] = None


@dataclass
class FromHFResult:
    checkpoint: Path
    num_tensors: int
    total_bytes: int
    seconds: float
    tokenizer: Optional[str]
    logits_max_diff: Optional[float] = None
    dtypes: list[str] = field(default_factory=list)


def check_parallel_sizes(cfg: ModelConfig, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    for what, n in (("attention heads", cfg.num_attention_heads), ("ffn hidden size", cfg.ffn_hidden_size),
                    ("vocab size", cfg.vocab_size)):
        if n % tp:
            raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the {what} ({n})")
    if pp > cfg.num_layers:
        raise ConfigError(f"--pipeline-model-parallel-size {pp} exceeds the number of layers ({cfg.num_layers})")


class _ShardReader:
    """Reads tensors of a HF source one at a time, keeping each shard file open once."""

    def __init__(self, src: HFSource, out_dtype: Optional[torch.dtype]):
        self.src = src
        self.out_dtype = out_dtype
        self.files: dict[Path, BinaryIO] = {}
        self.sums: dict[str, int] = {}
        self.on_tensor = lambda nbytes: None
        self._previous: Optional[torch.Tensor] = None

    def __call__(self, name: str) -> torch.Tensor:
        # DCP's writer still references the previous tensor while it asks for this one, though
        # that tensor's file is written and closed: free its memory now so at most one tensor
        # is resident (what was written is checked against the checksums afterwards).
        if self._previous is not None:
            self._previous.untyped_storage().resize_(0)
            self._previous = None
        path, entry = self.src.tensors[name]
        f = self.files.get(path)
        if f is None:
            f = self.files[path] = open(path, "rb")
        t = read_tensor(f, entry)
        if self.out_dtype is not None and t.dtype != self.out_dtype:
            t = t.to(self.out_dtype)
        self.sums[name] = checksum(t)
        self.on_tensor(t.numel() * t.element_size())
        self._previous = t
        return t

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def from_hf(opts: FromHFOptions) -> FromHFResult:
    from megatron_sc2.training.checkpoint import (checkpoint_dir, finalize, finished_iterations,
                                                  temporary_dir, write_meta)

    from megatron_sc2.convert.to_hf import refuse_overlap
    from megatron_sc2.training.checkpoint import write_failure

    t0 = time.perf_counter()
    refuse_overlap(Path(opts.load), Path(opts.save))
    src = open_hf_dir(opts.load)
    cfg = src.model_config
    check_parallel_sizes(cfg, opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size)
    save = Path(opts.save)
    done = finished_iterations(save)
    if done:
        raise CheckpointError(
            f"--save {save} already holds checkpoints (iterations {done[:5]}); a converted model "
            f"starts at iteration 0, so pick an empty directory")
    out_dtype = DTYPES[opts.dtype] if opts.dtype else None
    for name, (path, entry) in src.tensors.items():
        if not entry.dtype.is_floating_point:
            raise CheckpointError(f"{path}: tensor {name} has non-float dtype {entry.dtype}")
    specs = [TensorSpec(n, e.shape, out_dtype or e.dtype) for n, (_, e) in src.tensors.items()]
    total = sum(s.nbytes for s in specs)

    save.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(save, ITERATION, str(os.getpid()))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    reader = _ShardReader(src, out_dtype)
    try:
        with progress_bar(total, "from-hf", opts.progress) as bar:
            reader.on_tensor = bar.update
            save_model_streaming(tmp, specs, reader)
        reader.close()
        verify_checkpoint(tmp, specs, reader.sums)
        tokenizer = _copy_tokenizer(src.root, tmp / TOKENIZER_SUBDIR)
        final = checkpoint_dir(save, ITERATION)
        meta = {
            "iteration": ITERATION, "consumed_samples": 0, "model_config": cfg.to_dict(),
            "train_config": None, "has_optimizer": False,
            "tokenizer": str((final / TOKENIZER_SUBDIR).resolve()) if tokenizer else None,
            "converted_from": str(src.root.resolve()),
        }
        write_meta(tmp, meta)
        diff = None
        if opts.verify_logits:
            narrow = {s.dtype for s in specs} - {torch.float32}
            round_to = narrow.pop() if len(narrow) == 1 else None
            diff = verify_logits(tmp, src.root, cfg, round_to=round_to)
        final = finalize(tmp, save, ITERATION)
    except CheckpointException as e:  # DCP's wrapper of a failed write (a BaseException)
        reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write the checkpoint in {save} ({write_failure(e, save, total)}); "
                              "its temporary files were removed") from None
    except BaseException:
        reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FromHFResult(final, len(specs), total, time.perf_counter() - t0,
                        meta["tokenizer"], diff, sorted({str(s.dtype) for s in specs}))


def verify_checkpoint(ckpt: Path, specs: list[TensorSpec], sums: dict[str, int]) -> None:
    """Read every tensor back (DCP's metadata, each file's bytes memory-mapped) and compare
    names, shapes, dtypes and checksums with what was written."""
    want = {s.name: s for s in specs}
    seen: set[str] = set()
    for name, t in iter_own_files_mmap(ckpt):
        spec = want.get(name)
        if spec is None:
            raise CheckpointError(f"verify: {ckpt} holds an unexpected tensor {name}")
        check_read_back(name, t, spec.shape, spec.dtype, sums[name], ckpt)
        seen.add(name)
        del t
    if seen != set(want):
        raise CheckpointError(f"verify: tensors missing from {ckpt}: {sorted(set(want) - seen)[:3]}")


def _copy_tokenizer(hf_dir: Path, dest: Path) -> bool:
    files = [hf_dir / f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
    if not any(f.name in ("tokenizer.json", "vocab.json") for f in files):
        return False
    dest.mkdir()
    for f in files:
        shutil.copyfile(f, dest / f.name)
    return True
