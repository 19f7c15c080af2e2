"""Near-duplicates as BigCode found them: LSH over MinHash signatures (25 bands of 10 rows, a
Jaccard threshold of about (1/25)**(1/10) = 0.72), candidate pairs joined into clusters by
connected components, one file per cluster kept by the keep rule.

A candidate pair becomes an edge only when its signatures agree on at least `verify` of their
positions (the estimated Jaccard; default 0.7): without it a pair at Jaccard 0.5 still collides
in some band 2.4% of the time. `verify=0` is BigCode's run exactly. Within a band, each member
of a bucket is paired with the bucket's first member (the smallest uid).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from megatron_sc2.data.prep.clean import keep_rule
from megatron_sc2.data.prep.clean.minhash import has_shingles

BANDS, ROWS = 25, 10


def collision_probability(jaccard: float | np.ndarray, bands: int = BANDS, rows: int = ROWS):
    """The LSH S-curve: the chance two files at this Jaccard share at least one band."""
    return 1.0 - (1.0 - np.asarray(jaccard, dtype=np.float64) ** rows) ** bands


def band_keys(sigs: np.ndarray, bands: int = BANDS, rows: int = ROWS) -> np.ndarray:
    """(n, bands) uint64: each band's `rows` values folded into one 64-bit key (what the merge
    keeps per file instead of the whole signature: 200 bytes instead of 1,000). Two different
    bands share a key with probability ~2**-64; verification drops such a pair anyway."""
    n, perms = sigs.shape
    if bands * rows > perms:
        raise ValueError(f"{bands} bands x {rows} rows need {bands * rows} permutations, have {perms}")
    v = sigs[:, :bands * rows].reshape(n, bands, rows).astype(np.uint64)
    k = np.zeros((n, bands), dtype=np.uint64)
    for r in range(rows):
        k ^= v[:, :, r]
        k *= _FOLD
        k ^= k >> np.uint64(29)
    return k


_FOLD = np.uint64(0xBF58476D1CE4E5B9)

RowGetter = Callable[[np.ndarray], np.ndarray]


def edges_from_band_keys(keys: np.ndarray, live: np.ndarray, sig_rows: Optional[RowGetter] = None,
                         verify: float = 0.7) -> np.ndarray:
    """(m, 2) row-index pairs (i, first member of i's bucket) over all bands; with `verify`,
    only pairs whose signatures (from `sig_rows(indices)`) agree on that fraction."""
    live_idx = np.flatnonzero(live)
    edges = []
    for b in range(keys.shape[1]):
        _, first, inverse = np.unique(keys[live_idx, b], return_index=True, return_inverse=True)
        head = first[inverse.ravel()]
        sel = head != np.arange(live_idx.size)
        if sel.any():
            edges.append(np.stack([live_idx[sel], live_idx[head[sel]]], axis=1))
    if not edges:
        return np.zeros((0, 2), dtype=np.int64)
    e = np.unique(np.concatenate(edges), axis=0)
    if verify > 0:
        if sig_rows is None:
            raise ValueError("verification needs the signatures")
        agree = np.empty(len(e), dtype=np.float64)
        for lo in range(0, len(e), 65536):
            blk = e[lo:lo + 65536]
            agree[lo:lo + 65536] = (sig_rows(blk[:, 0]) == sig_rows(blk[:, 1])).mean(axis=1)
        e = e[agree >= verify]
    return e


def candidate_edges(sigs: np.ndarray, bands: int = BANDS, rows: int = ROWS, verify: float = 0.7) -> np.ndarray:
    """The edges of a signature matrix held in memory."""
    return edges_from_band_keys(band_keys(sigs, bands, rows), has_shingles(sigs), lambda i: sigs[i], verify)


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected component label of each of n rows."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, dtype=np.int64)
    g = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(g, directed=False)[1]


def duplicates(uid: np.ndarray, sigs: np.ndarray, keys: np.ndarray, verify: float = 0.7,
               bands: int = BANDS, rows: int = ROWS) -> np.ndarray:
    """`duplicates_from_bands` of a signature matrix held in memory."""
    return duplicates_from_bands(uid, band_keys(sigs, bands, rows), has_shingles(sigs), lambda i: sigs[i], keys, verify)


def duplicates_from_bands(uid: np.ndarray, bkeys: np.ndarray, live: np.ndarray, sig_rows: Optional[RowGetter],
                          keys: np.ndarray, verify: float = 0.7) -> np.ndarray:
    """For each row, -1 when kept, else the uid of the file kept for its cluster. Rows must be in
    uid order (the bucket heads then do not depend on how the input was sharded)."""
    if uid.size == 0:
        return np.full(0, -1, dtype=np.int64)
    comp = components(uid.size, edges_from_band_keys(bkeys, live, sig_rows, verify))
    return keep_rule.keepers(uid, keys, comp)
