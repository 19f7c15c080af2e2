"""Exact duplicates by content hash (blake2b-128 of the UTF-8 text): one file per hash is kept,
chosen by the keep rule; it runs before the near-duplicate stage and is cheap."""

from __future__ import annotations

import hashlib

import numpy as np

from megatron_sc2.data.prep.clean import keep_rule


def content_hash(text: str) -> tuple[int, int]:
    d = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def duplicates(uid: np.ndarray, hashes: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """For each row, -1 when it is kept, else the uid of the kept file with the same content.
    `hashes` is (n, 2) uint64."""
    n = uid.size
    keeper = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return keeper
    _, group = np.unique(hashes, axis=0, return_inverse=True)
    group = group.ravel()
    idx = keep_rule.order(uid, keys, group)
    g = group[idx]
    first = np.ones(n, dtype=bool)
    first[1:] = g[1:] != g[:-1]
    head = idx[np.maximum.accumulate(np.where(first, np.arange(n), 0))]
    dup = ~first
    keeper[idx[dup]] = uid[head[dup]]
    return keeper
