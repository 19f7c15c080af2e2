"""Blends of several datasets in exact, deterministic proportions (Megatron's `BlendedDataset`).

Sample i of a blend comes from the dataset whose count lags its weight the most after i
samples (greedy on the error `weight * max(i, 1) - taken`), so every prefix of the blend is
as close to the weights as integers allow. megatron-core's compiled helper computes the same
thing; we use it when it is importable and a NumPy/Python loop otherwise.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_sc2.errors import ConfigError
from megatron_sc2.data.indexed import index_file_path, strip_suffix


def parse_blend(items: Sequence[str], what: str = "--data-path") -> tuple[list[str], Optional[list[float]]]:
    """Megatron's syntax: `P`, `P1 P2 ...` or `W1 P1 W2 P2 ...`; a single item naming a file
    that is not a dataset is read as a file of those (whitespace separated, `#` comments)."""
    items = [s for item in items for s in str(item).split()]
    if len(items) == 1 and Path(items[0]).is_file() and not index_file_path(strip_suffix(items[0])).is_file():
        text = Path(items[0]).read_text()
        items = [tok for line in text.splitlines() for tok in line.split("#", 1)[0].split()]
        if not items:
            raise ConfigError(f"{what}: the file is empty")
    if not items:
        raise ConfigError(f"{what} is empty")

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if len(items) % 2 == 0 and all(is_number(items[i]) for i in range(0, len(items), 2)):
        weights = [float(items[i]) for i in range(0, len(items), 2)]
        prefixes = [strip_suffix(items[i + 1]) for i in range(0, len(items), 2)]
        if any(not math.isfinite(w) for w in weights):
            raise ConfigError(f"{what}: weights must be finite numbers (no nan or inf), got {weights}")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"{what}: weights must be non-negative with a positive sum, got {weights}")
        keep = [i for i, w in enumerate(weights) if w > 0]
        return [prefixes[i] for i in keep], [weights[i] for i in keep]
    if any(is_number(s) and not Path(strip_suffix(s) + ".idx").exists() for s in items):
        raise ConfigError(f"{what}: expected `PREFIX ...` or `WEIGHT PREFIX ...` pairs, got {' '.join(items)}")
    return [strip_suffix(s) for s in items], None


def normalize(weights: Sequence[float]) -> list[float]:
    w = np.asarray(weights, dtype=np.float64)
    return (w / w.sum()).tolist()


def samples_per_dataset(weights: Sequence[float], target: int, surplus: float = 0.005) -> list[int]:
    """Samples to build from each dataset for a blend of `target` samples (Megatron's margin)."""
    return [int(math.ceil(math.ceil(target * w) * (1 + surplus))) for w in weights]


def _helpers_cpp():
    """megatron-core's compiled helper, loaded without importing megatron.core (slow)."""
    try:
        spec = importlib.util.find_spec("megatron")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for so in sorted((Path(root) / "core" / "datasets").glob("helpers_cpp*.so")):
            try:
                loader = importlib.machinery.ExtensionFileLoader("megatron.core.datasets.helpers_cpp", str(so))
                mspec = importlib.util.spec_from_file_location("megatron.core.datasets.helpers_cpp", so, loader=loader)
                mod = importlib.util.module_from_spec(mspec)
                loader.exec_module(mod)
                return mod
            except Exception:
                return None
    return None


def build_blending_indices_py(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """The greedy rule in plain Python (fallback; ~1 s per million samples)."""
    w = [float(x) for x in weights]
    n = len(w)
    taken = [0] * n
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    for i in range(size):
        x = float(max(i, 1))
        best, best_err = 0, w[0] * x - taken[0]
        for d in range(1, n):
            err = w[d] * x - taken[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[i] = best
        dataset_sample_index[i] = taken[best]
        taken[best] += 1
    return dataset_index, dataset_sample_index


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    helpers = _helpers_cpp()
    if helpers is None:
        return build_blending_indices_py(weights, size)
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(dataset_index, dataset_sample_index,
                                   np.asarray(weights, dtype=np.float64), len(weights), size, False)
    return dataset_index, dataset_sample_index


class BlendedSampleDataset:
    """`size` samples drawn from `datasets` in the proportions `weights` (normalized)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        self.datasets = list(datasets)
        self.weights = normalize(weights)
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, self.size)
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (need, ds) in enumerate(zip(counts, self.datasets)):
            if need > len(ds):
                raise ConfigError(f"blend requests {need} samples from dataset {d} which has only {len(ds)}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range ({self.size} samples)")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
