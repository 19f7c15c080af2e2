"""Deterministic random-token samples (Megatron's `--mock-data`), for tests and benchmarks
that need no corpus: sample i is a pure function of (seed, i)."""

from __future__ import annotations

import numpy as np


class MockDataset:
    def __init__(self, vocab_size: int, seq_length: int, seed: int, length: int = 1 << 40):
        self.vocab_size, self.seq_length, self.seed, self.length = vocab_size, seq_length, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        # Token 0 (end of document) never appears: samples are one document each.
        return rng.integers(1, self.vocab_size, size=self.seq_length + 1, dtype=np.int64)
