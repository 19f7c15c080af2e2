"""Ranked free-text search (BM25), the second mode of `search find` (`--bm25`), as StarCoder2
Search ranks with Elasticsearch's `match` query.

Terms: `\\w+` runs of the lower-cased document text (the text between special tokens; a
snake_case name stays one term, as in Elasticsearch's standard analyzer). Per shard: the
vocabulary (`bm25-vocab-i.json`), and postings in CSR form, memory-mapped (`bm25-offsets-i.npy`
int64 per term, `bm25-rows-i.npy` the shard's document rows, `bm25-tf-i.npy` term frequencies,
`bm25-len-i.npy` terms per document). Scores are Lucene's BM25 with k1 = 1.2, b = 0.75 and
idf = ln(1 + (N - df + 0.5) / (df + 0.5)), N, df and the mean length taken over all shards.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from megatron_sc2.errors import DataError

WORD = re.compile(r"\w+")
K1, B = 1.2, 0.75
FILES = ("offsets", "rows", "tf", "len")


def terms(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _paths(directory: Path, name: str) -> dict[str, Path]:
    out = {k: directory / f"bm25-{k}-{name}.npy" for k in FILES}
    out["vocab"] = directory / f"bm25-vocab-{name}.json"
    return out


def build_shard(doc_texts: Iterable[str], directory: Path, name: str) -> int:
    """Write one shard's BM25 files from its documents' texts (in shard row order)."""
    vocab: dict[str, int] = {}
    t_ids: list[int] = []
    rows: list[int] = []
    tfs: list[int] = []
    lengths: list[int] = []
    for row, text in enumerate(doc_texts):
        words = terms(text)
        lengths.append(len(words))
        for w, c in Counter(words).items():
            t_ids.append(vocab.setdefault(w, len(vocab)))
            rows.append(row)
            tfs.append(c)
    t = np.asarray(t_ids, dtype=np.int64)
    order = np.argsort(t, kind="stable")
    offsets = np.zeros(len(vocab) + 1, dtype=np.int64)
    np.cumsum(np.bincount(t, minlength=len(vocab)), out=offsets[1:])
    arrays = {"offsets": offsets, "rows": np.asarray(rows, dtype=np.int64)[order].astype(np.int32),
              "tf": np.asarray(tfs, dtype=np.int64)[order].astype(np.uint32),
              "len": np.asarray(lengths, dtype=np.int32)}
    paths = _paths(directory, name)
    for k, arr in arrays.items():
        tmp = paths[k].with_name(paths[k].name + f".tmp-{os.getpid()}.npy")
        np.save(tmp, arr)
        os.replace(tmp, paths[k])
    words = sorted(vocab, key=vocab.__getitem__)
    tmp = paths["vocab"].with_name(paths["vocab"].name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(words, ensure_ascii=False))
    os.replace(tmp, paths["vocab"])
    return len(lengths)


@dataclass
class BM25Shard:
    vocab: dict[str, int]
    offsets: np.ndarray
    rows: np.ndarray
    tf: np.ndarray
    lengths: np.ndarray

    @staticmethod
    def open(directory: Path, name: str, documents: int) -> "BM25Shard":
        paths = _paths(directory, name)
        for p in paths.values():
            if not p.is_file():
                raise DataError(f"{p}: missing file of the BM25 index (build with `search build --bm25`)")
        try:
            words = json.loads(paths["vocab"].read_text(encoding="utf-8"))
            arrays = {k: np.load(paths[k], mmap_mode="r") for k in FILES}
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{paths['vocab'].parent}: corrupt BM25 files of shard {name} ({e})") from None
        off = arrays["offsets"]
        if (len(off) != len(words) + 1 or len(arrays["len"]) != documents or off[-1] != len(arrays["rows"])
                or len(arrays["rows"]) != len(arrays["tf"])):
            raise DataError(f"{paths['offsets']}: BM25 files of shard {name} disagree with each other or the index")
        return BM25Shard({w: i for i, w in enumerate(words)}, off, arrays["rows"], arrays["tf"], arrays["len"])

    def postings(self, term: str) -> tuple[np.ndarray, np.ndarray]:
        i = self.vocab.get(term)
        if i is None:
            return np.zeros(0, np.int32), np.zeros(0, np.uint32)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self.rows[a:b]), np.asarray(self.tf[a:b])


def rank(shards: Sequence[BM25Shard], query: str, limit: int) -> tuple[int, list[tuple[float, int, int]]]:
    """(documents matching any term, [(score, shard, row)] best first, at most `limit`)."""
    q = list(dict.fromkeys(terms(query)))
    n_docs = sum(len(s.lengths) for s in shards)
    if not q or not n_docs:
        return 0, []
    avgdl = sum(float(np.asarray(s.lengths, dtype=np.float64).sum()) for s in shards) / n_docs
    posts = [[s.postings(t) for t in q] for s in shards]
    df = [sum(len(p[j][0]) for p in posts) for j in range(len(q))]
    idf = [float(np.log(1 + (n_docs - d + 0.5) / (d + 0.5))) for d in df]
    matched, best = 0, []
    for si, (s, ps) in enumerate(zip(shards, posts)):
        score = np.zeros(len(s.lengths), dtype=np.float64)
        hit = np.zeros(len(s.lengths), dtype=bool)
        norm = K1 * (1 - B + B * np.asarray(s.lengths, dtype=np.float64) / max(avgdl, 1e-9))
        for j, (rows, tf) in enumerate(ps):
            if len(rows):
                tf = tf.astype(np.float64)
                score[rows] += idf[j] * tf * (K1 + 1) / (tf + norm[rows])
                hit[rows] = True
        idx = np.flatnonzero(hit)
        matched += len(idx)
        if len(idx) > limit:
            idx = idx[np.argpartition(-score[idx], limit - 1)[:limit]] if limit else idx[:0]
        best += [(float(score[r]), si, int(r)) for r in idx]
    best.sort(key=lambda x: (-x[0], x[1], x[2]))
    return matched, best[:limit]
