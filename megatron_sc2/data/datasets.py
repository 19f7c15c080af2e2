"""`build_train_valid_test_datasets`: what the trainer calls to get its samples.

`--data-path` (one prefix, several, weighted pairs, or a file of those) is split by
`--split` per dataset (Megatron's document ranges), or `--train/valid/test-data-path` name
each split's data; weighted blends mix in exact proportions; FIM is applied on top when
`--fim-rate > 0`. Every dataset is indexed by global sample index and deterministic.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

from megatron_sc2.errors import ConfigError
from megatron_sc2.data.blending import BlendedSampleDataset, normalize, parse_blend, samples_per_dataset
from megatron_sc2.data.fim import FimDataset
from megatron_sc2.data.gpt_dataset import GPTSampleDataset, SampleSpec
from megatron_sc2.data.indexed import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> normalized [train, valid, test] fractions (missing entries are 0)."""
    parts = [p for p in re.split(r"[,/ ]+", str(split).strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--split {split!r}: expected up to three numbers like 969,30,1") from None
    if any(not math.isfinite(v) for v in values):
        raise ConfigError(f"--split {split!r}: every part must be a finite number (no nan or inf)")
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum")
    values += [0.0] * (3 - len(values))
    return normalize(values)


def split_document_ranges(split: Sequence[float], num_docs: int) -> list[Optional[tuple[int, int]]]:
    """Megatron's bookends: split i covers sequences [round(c_i * N), round(c_{i+1} * N))."""
    out: list[Optional[tuple[int, int]]] = []
    acc = 0.0
    for frac in split:
        lo, hi = acc, acc + frac
        acc = hi
        out.append(None if frac <= 0 else (int(round(lo * num_docs)), int(round(hi * num_docs))))
    return out


class _Opened:
    """Each prefix opened (and checked against the vocabulary) once."""

    def __init__(self, vocab_size: Optional[int]):
        self.vocab_size = vocab_size
        self.cache: dict[str, IndexedDataset] = {}

    def __call__(self, prefix: str) -> IndexedDataset:
        if prefix not in self.cache:
            ds = IndexedDataset(prefix)
            if self.vocab_size is not None:
                ds.check_vocab(self.vocab_size)
            self.cache[prefix] = ds
        return self.cache[prefix]


def _cache_dir(cfg, prefix: str) -> Path:
    if cfg.data_cache_path:
        return Path(cfg.data_cache_path)
    return Path(prefix).resolve().parent / "cache" / "megatron_sc2_indices"


def _single(cfg, ds: IndexedDataset, prefix: str, split_name: str, rng: tuple[int, int],
            n: Optional[int]) -> GPTSampleDataset:
    lo, hi = rng
    if hi <= lo or int(ds.sequence_lengths[lo:hi].sum()) <= 1:
        raise ConfigError(f"the {split_name} split of {prefix} is empty (--split {cfg.split} over "
                          f"{len(ds)} documents) but {n or 'some'} {split_name} samples are needed")
    spec = SampleSpec(prefix=str(Path(prefix).resolve()), split_name=split_name, doc_begin=lo, doc_end=hi,
                      num_samples=n, seq_length=cfg.seq_length, seed=cfg.seed)
    return GPTSampleDataset(ds, spec, _cache_dir(cfg, prefix))


def _blend(cfg, opened: _Opened, prefixes: list[str], weights: Optional[list[float]], split_name: str,
           split: list[float], split_index: int, n: int):
    ranges = []
    for p in prefixes:
        ds = opened(p)
        ranges.append(split_document_ranges(split, len(ds))[split_index])
    if all(r is None for r in ranges):
        return None
    if len(prefixes) == 1:
        return _single(cfg, opened(prefixes[0]), prefixes[0], split_name, ranges[0], n)
    if weights is None:
        # Megatron: an unweighted list builds one epoch of each and blends them by size.
        parts = [_single(cfg, opened(p), p, split_name, r, None) for p, r in zip(prefixes, ranges) if r]
        lens = [float(len(d)) for d in parts]
        return BlendedSampleDataset(parts, lens, min(n, int(sum(lens))))
    weights = normalize(weights)
    target = samples_per_dataset(weights, n, surplus=0.0)
    sizes = samples_per_dataset(weights, n)
    parts = [_single(cfg, opened(p), p, split_name, r, k) for p, r, k in zip(prefixes, ranges, sizes)]
    n = sum(target)  # Megatron's blend size: the per-dataset targets summed (>= n)
    return BlendedSampleDataset(parts, weights, n)


def build_train_valid_test_datasets(cfg, tokenizer, num_samples: tuple[int, int, int]):
    """(train, valid, test); an entry is None when its split is empty or no samples are asked."""
    opened = _Opened(tokenizer.vocab_size if tokenizer is not None else None)
    per_split_paths = [cfg.train_data_path, cfg.valid_data_path, cfg.test_data_path]
    out = []
    if any(per_split_paths):
        for i, (name, paths, n) in enumerate(zip(SPLIT_NAMES, per_split_paths, num_samples)):
            if not paths or not n:
                out.append(None)
                continue
            prefixes, weights = parse_blend(paths, f"--{name}-data-path")
            out.append(_blend(cfg, opened, prefixes, weights, name, [1.0, 0.0, 0.0], 0, int(n)))
    else:
        if not cfg.data_path:
            raise ConfigError("no training data: set --data-path (or --train-data-path)")
        prefixes, weights = parse_blend(cfg.data_path, "--data-path")
        split = parse_split(cfg.split)
        for i, (name, n) in enumerate(zip(SPLIT_NAMES, num_samples)):
            if not n:
                out.append(None)
                continue
            out.append(_blend(cfg, opened, prefixes, weights, name, split, i, int(n)))
    if cfg.fim_rate > 0:
        out = [None if d is None else FimDataset(d, tokenizer, cfg.fim_rate, cfg.fim_spm_rate, cfg.seed, i)
               for i, d in enumerate(out)]
    return tuple(out)
