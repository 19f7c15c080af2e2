"""Deterministic random-token samples (Megatron's `--mock-data`), for tests and benchmarks
that need no corpus: sample i is a pure function of (seed, i)."""

from __future__ import annotations

import numpy as np

# About one token in 16 is an end of document, so samples are packed documents and
# --reset-position-ids / --reset-attention-mask / --eod-mask-loss have something to act on.
EOD_RATE = 1 / 16


class MockDataset:
    def __init__(self, vocab_size: int, seq_length: int, seed: int, length: int = 1 << 40,
                 eod: int = 0):
        self.vocab_size, self.seq_length, self.seed, self.length = vocab_size, seq_length, seed, length
        self.eod = eod

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        tokens = rng.integers(1, self.vocab_size, size=self.seq_length + 1, dtype=np.int64)
        tokens[rng.random(self.seq_length + 1) < EOD_RATE] = self.eod
        return tokens
