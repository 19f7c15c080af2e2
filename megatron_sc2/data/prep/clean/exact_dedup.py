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
    if uid.size == 0:
        return np.full(0, -1, dtype=np.int64)
    _, group = np.unique(hashes, axis=0, return_inverse=True)
    return keep_rule.keepers(uid, keys, group.ravel())
