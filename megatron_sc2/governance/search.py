"""`megatron-sc2 search build|merge|count|find`: exact search of the tokenized corpus with suffix
arrays over the tokens, the approach of infini-gram (Liu et al. 2024).

An index directory holds shards, each a contiguous run of documents: `tokens-i.bin` (the
documents' tokens, each document preceded by a separator 0xFFFF, one more at the end -- infini-
gram's token file, which our uint16 `.bin` plus the `.idx` document starts map onto), `sa-i.bin`
(the suffix array of that token string, uint32 token positions, built by libdivsufsort through
`pydivsufsort`), `docs-i.bin` (int64 separator positions). `search.json` lists the shards. A
count is two binary searches per shard over memory-mapped files (no load step); `find` maps hit
positions to documents and, through the provenance sidecar, to repository and file.

A query is the token sequence of its text under the corpus's tokenizer; a text the tokenizer
cannot represent (bytes without a token) or longer than any document answers 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from megatron_sc2.data.indexed import IndexedDataset, strip_suffix
from megatron_sc2.data.provenance import open_provenance
from megatron_sc2.errors import CommandLineParser, ConfigError, DataError
from megatron_sc2.governance.shards import add_submit_flags, document_ranges, parse_shard, submit_main

MANIFEST = "search.json"
FORMAT = "megatron_sc2.search"
VERSION = 1
DEFAULT_SHARD_TOKENS = 500_000_000


def _shard_files(directory: Path, name: str) -> dict[str, Path]:
    return {k: directory / f"{k}-{name}.bin" for k in ("tokens", "sa", "docs")}


@dataclass
class ShardInfo:
    name: str
    pieces: list[list[int]]   # [dataset, first document, end document] in token order
    tokens: int               # length of the token string (separators included)
    documents: int
    token_dtype: str
    sa_dtype: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _corpus_meta(datasets: Sequence[IndexedDataset]) -> dict[str, Any]:
    return {"datasets": [d.prefix for d in datasets], "documents": [d.num_documents for d in datasets],
            "tokens": [d.num_tokens for d in datasets]}


def _separator(dtype: np.dtype) -> tuple[np.dtype, int]:
    if np.dtype(dtype).itemsize <= 2:
        return np.dtype(np.uint16), 0xFFFF
    return np.dtype(np.uint32), 0xFFFFFFFF


def build_shard(datasets: Sequence[IndexedDataset], pieces: Sequence[tuple[int, int, int]], directory: Path,
                name: str, text=None) -> ShardInfo:
    """Write one shard's three files (temporary names, renamed when complete); with `text` (a
    TokenText) also its BM25 files."""
    from pydivsufsort import divsufsort

    tdtype, sep = _separator(datasets[0].dtype)
    parts, starts = [], []
    pos = 0
    for di, first, end in pieces:
        ds = datasets[di]
        tok_starts = np.concatenate([[0], np.cumsum(ds.sequence_lengths, dtype=np.int64)])[ds.document_indices]
        a, b = int(tok_starts[first]), int(tok_starts[end])
        body = np.asarray(ds._bin_map[a:b] if b > a else np.zeros(0, ds.dtype)).astype(tdtype)
        rel = tok_starts[first:end] - a
        parts.append(np.insert(body, rel, sep))
        starts.append(pos + rel + np.arange(len(rel)))
        pos += len(parts[-1])
    parts.append(np.asarray([sep], dtype=tdtype))
    tokens = np.concatenate(parts)
    doc_pos = np.concatenate(starts + [np.asarray([pos], dtype=np.int64)]).astype(np.int64)
    sa = divsufsort(tokens)
    sa_dtype = np.uint32 if len(tokens) < 2 ** 32 else np.int64
    files = _shard_files(directory, name)
    directory.mkdir(parents=True, exist_ok=True)
    for key, arr in (("tokens", tokens), ("sa", np.asarray(sa).astype(sa_dtype)), ("docs", doc_pos)):
        tmp = files[key].with_name(files[key].name + f".tmp-{os.getpid()}")
        arr.tofile(tmp)
        os.replace(tmp, files[key])
    if text is not None:
        from megatron_sc2.governance import bm25

        bm25.build_shard(("\n".join(text.segments(datasets[di].document(d))) for di, first, end in pieces
                          for d in range(first, end)), directory, name)
    return ShardInfo(name, [list(map(int, p)) for p in pieces], int(len(tokens)), int(len(doc_pos) - 1),
                     np.dtype(tdtype).name, np.dtype(sa_dtype).name)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def build(prefixes: Sequence[str], output: str | os.PathLike, tokenizer: Optional[str] = None,
          shard: Optional[tuple[int, int]] = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
          with_bm25: bool = False) -> dict[str, Any]:
    """The whole index (cut into shards of at most about `shard_tokens` tokens), or with `shard`
    one part i of N (then `merge` writes the manifest); `with_bm25` adds the ranked mode."""
    if not prefixes:
        raise ConfigError("--data-path: give at least one dataset prefix")
    text = None
    if with_bm25:
        if not tokenizer:
            raise ConfigError("--bm25 needs --tokenizer-model (the documents are ranked as text)")
        from megatron_sc2.data.tokenizer import load_tokenizer
        from megatron_sc2.governance.corpus_text import TokenText

        text = TokenText(load_tokenizer(tokenizer))
    datasets = [IndexedDataset(strip_suffix(p)) for p in prefixes]
    kinds = {np.dtype(d.dtype).itemsize <= 2 for d in datasets}
    if len(kinds) > 1:
        raise DataError(f"{datasets[0].idx_path}: datasets of different token dtypes cannot share an index")
    out = Path(output)
    meta = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer, "bm25": with_bm25, **_corpus_meta(datasets)}
    if shard is not None:
        i, n = shard
        info = build_shard(datasets, document_ranges(datasets, i, n), out, f"{i:05d}-of-{n:05d}", text)
        _write_json(out / f"shard-{i:05d}-of-{n:05d}.json", {**meta, "shard": info.to_json()})
        return {**meta, "shards": [info.to_json()]}
    total = sum(d.num_tokens for d in datasets)
    n = max(1, -(-total // max(shard_tokens, 1)))
    infos = [build_shard(datasets, document_ranges(datasets, i, n), out, f"{i:05d}-of-{n:05d}", text).to_json()
             for i in range(n)]
    manifest = {**meta, "shards": infos}
    _write_json(out / MANIFEST, manifest)
    return manifest


def merge(output: str | os.PathLike) -> dict[str, Any]:
    """The manifest of shards built apart (`build --shard i/N`); every shard must be there."""
    out = Path(output)
    parts = sorted(out.glob("shard-*-of-*.json"))
    if not parts:
        raise DataError(f"{out}: no search shards to merge")
    metas = []
    for p in parts:
        try:
            metas.append(json.loads(p.read_text()))
        except ValueError:
            raise DataError(f"{p}: corrupt shard description") from None
    n = {m["shard"]["name"].split("-of-")[1] for m in metas}
    if len(n) != 1:
        raise DataError(f"{out}: shards of different builds ({sorted(n)}); remove the stale ones")
    count = int(n.pop())
    names = {m["shard"]["name"] for m in metas}
    missing = [f"shard-{i:05d}-of-{count:05d}.json" for i in range(count) if f"{i:05d}-of-{count:05d}" not in names]
    if missing:
        raise DataError(f"{out / missing[0]}: missing ({len(missing)} of {count} shards not built yet)")
    base = {k: v for k, v in metas[0].items() if k != "shard"}
    for p, m in zip(parts, metas):
        if {k: v for k, v in m.items() if k != "shard"} != base:
            raise DataError(f"{p}: shard of other datasets than {parts[0]}")
    manifest = {**base, "shards": [m["shard"] for m in metas]}
    _write_json(out / MANIFEST, manifest)
    return manifest


# -- queries -------------------------------------------------------------------------------

@dataclass
class Shard:
    info: ShardInfo
    tokens: np.ndarray
    sa: np.ndarray
    docs: np.ndarray

    def _cmp(self, pos: int, q: np.ndarray) -> int:
        """-1, 0, 1: the suffix at pos against q, compared on len(q) tokens."""
        s = self.tokens[pos:pos + len(q)]
        diff = np.flatnonzero(s != q[:len(s)])
        if len(diff):
            j = int(diff[0])
            return -1 if s[j] < q[j] else 1
        return 0 if len(s) == len(q) else -1

    def range(self, q: np.ndarray) -> tuple[int, int]:
        """[lo, hi) of the suffix array rows that start with q."""
        n = len(self.sa)
        lo, hi = 0, n
        while lo < hi:  # first row >= q
            mid = (lo + hi) // 2
            if self._cmp(int(self.sa[mid]), q) < 0:
                lo = mid + 1
            else:
                hi = mid
        first = lo
        hi = n
        while lo < hi:  # first row > q
            mid = (lo + hi) // 2
            if self._cmp(int(self.sa[mid]), q) <= 0:
                lo = mid + 1
            else:
                hi = mid
        return first, lo

    def locate(self, row: int) -> tuple[int, int]:
        """(dataset, document) of the shard's document row."""
        base = 0
        for di, first, end in self.info.pieces:
            if row < base + end - first:
                return di, first + row - base
            base += end - first
        raise IndexError(row)


@dataclass
class Hit:
    dataset: str
    document: int
    token_offset: Optional[int]
    repository: Optional[str] = None
    path: Optional[str] = None
    source: Optional[str] = None
    snippet: str = ""
    score: Optional[float] = None


class SearchIndex:
    """An opened index: every shard's files memory-mapped and checked against the manifest."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        mpath = self.directory / MANIFEST
        if not mpath.is_file():
            raise DataError(f"{mpath}: search index not found (run `megatron-sc2 search build`, or "
                            "`search merge` after sharded builds)")
        try:
            self.manifest = json.loads(mpath.read_text())
            ok = self.manifest.get("format") == FORMAT
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise DataError(f"{mpath}: not a search index manifest")
        if self.manifest.get("version") != VERSION:
            raise DataError(f"{mpath}: search index version {self.manifest.get('version')}, this build reads {VERSION}")
        self.datasets = self.manifest["datasets"]
        self.shards: list[Shard] = []
        for s in self.manifest["shards"]:
            info = ShardInfo(**s)
            files = _shard_files(self.directory, info.name)
            arrays = {}
            for key, dtype, count in (("tokens", info.token_dtype, info.tokens), ("sa", info.sa_dtype, info.tokens),
                                      ("docs", "int64", info.documents + 1)):
                p = files[key]
                if not p.is_file():
                    raise DataError(f"{p}: missing file of the search index")
                want = count * np.dtype(dtype).itemsize
                if p.stat().st_size != want:
                    raise DataError(f"{p}: truncated or corrupt ({p.stat().st_size} bytes, the manifest implies {want})")
                arrays[key] = np.memmap(p, dtype=dtype, mode="r") if want else np.zeros(0, dtype)
            self.shards.append(Shard(info, arrays["tokens"], arrays["sa"], arrays["docs"]))
        self._prov: dict[int, Any] = {}
        self._bm25: Optional[list] = None
        self._datasets: dict[int, IndexedDataset] = {}

    @property
    def num_tokens(self) -> int:
        return sum(int(t) for t in self.manifest["tokens"])

    def count_ids(self, ids: Sequence[int] | np.ndarray) -> int:
        q = self._query(ids)
        if q is None:
            return 0
        total = 0
        for sh in self.shards:
            lo, hi = sh.range(q)
            total += hi - lo
        return total

    def _query(self, ids) -> Optional[np.ndarray]:
        q = np.asarray(ids, dtype=np.int64).ravel()
        if not len(q) or not self.shards:
            return None
        dt = self.shards[0].tokens.dtype
        if q.min() < 0 or q.max() >= np.iinfo(dt).max:  # no such token (or the separator): 0
            return None
        return q.astype(dt)

    def find_ids(self, ids: Sequence[int] | np.ndarray, limit: int = 10) -> tuple[int, list[tuple[int, int, int]]]:
        """(count, [(dataset, document, token offset)]) of at most `limit` hits, in corpus order."""
        q = self._query(ids)
        if q is None:
            return 0, []
        total, out = 0, []
        for sh in self.shards:
            lo, hi = sh.range(q)
            total += hi - lo
            if len(out) >= limit or hi == lo:
                continue
            pos = np.sort(np.asarray(sh.sa[lo:min(hi, lo + limit - len(out))], dtype=np.int64))
            rows = np.searchsorted(sh.docs, pos, side="right") - 1
            for p_, r in zip(pos.tolist(), rows.tolist()):
                out.append((*sh.locate(r), p_ - int(sh.docs[r]) - 1))
        return total, out

    def rank_bm25(self, query: str, limit: int = 10) -> tuple[int, list[tuple[float, int, int]]]:
        """(documents holding any query term, [(score, dataset, document)] best first)."""
        from megatron_sc2.governance import bm25

        if not self.manifest.get("bm25"):
            raise DataError(f"{self.directory / MANIFEST}: built without --bm25; rebuild with it for ranked search")
        if self._bm25 is None:
            self._bm25 = [bm25.BM25Shard.open(self.directory, sh.info.name, sh.info.documents) for sh in self.shards]
        matched, best = bm25.rank(self._bm25, query, limit)
        return matched, [(score, *self.shards[si].locate(row)) for score, si, row in best]

    def describe_ranked(self, ranked: Sequence[tuple[float, int, int]], query: str, tok, context: int = 80) -> list[Hit]:
        """Hits of the ranked mode: the snippet and file around the first query term in the text."""
        import re

        from megatron_sc2.governance.bm25 import terms

        words = sorted(set(terms(query)), key=len, reverse=True)
        pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)", re.IGNORECASE) if words else None
        names = [tok.decode([i]) for i in sorted(set(tok.special_ids.values()))]
        specials = re.compile("|".join(re.escape(n) for n in names if n)) if any(names) else None
        out = []
        for score, di, doc in ranked:
            h = Hit(self.datasets[di], doc, None, score=score)
            text = tok.decode(self.dataset(di).document(doc).tolist())
            plain = specials.sub(lambda m: " " * len(m.group()), text) if specials else text
            m = pattern.search(plain) if pattern else None
            at = m.start() if m else 0
            h.snippet = plain[max(0, at - context): at + context].strip()
            prov = self.provenance(di)
            if prov is not None:
                o = prov[doc]
                h.repository, h.source = o.repository, o.source
                for f in o.files:
                    if f.char_start <= at < max(f.char_end, f.char_start + 1):
                        h.path = f.path
                if h.path is None and len(o.files) == 1:
                    h.path = o.files[0].path
            out.append(h)
        return out

    def dataset(self, i: int) -> IndexedDataset:
        if i not in self._datasets:
            ds = IndexedDataset(self.datasets[i])
            if (ds.num_documents, ds.num_tokens) != (self.manifest["documents"][i], self.manifest["tokens"][i]):
                raise DataError(f"{ds.idx_path}: changed since the search index {self.directory} was built "
                                f"({ds.num_documents} documents / {ds.num_tokens} tokens, the index has "
                                f"{self.manifest['documents'][i]} / {self.manifest['tokens'][i]}); rebuild the index")
            self._datasets[i] = ds
        return self._datasets[i]

    def provenance(self, i: int):
        if i not in self._prov:
            self._prov[i] = open_provenance(self.datasets[i], self.manifest["documents"][i])
        return self._prov[i]

    def describe(self, hits: Sequence[tuple[int, int, int]], qlen: int, tok=None, context: int = 24) -> list[Hit]:
        out = []
        for di, doc, off in hits:
            h = Hit(self.datasets[di], doc, off)
            prov = self.provenance(di)
            if prov is not None:
                o = prov[doc]
                h.repository, h.source = o.repository, o.source
                for f in o.files:
                    if f.token_start is not None and f.token_start <= off < f.token_end:
                        h.path = f.path
                if h.path is None and len(o.files) == 1:
                    h.path = o.files[0].path
            if tok is not None:
                ids = self.dataset(di).document(doc)
                h.snippet = tok.decode(ids[max(0, off - context): off + qlen + context].tolist())
            out.append(h)
        return out


def encode_query(tok, text: str) -> Optional[list[int]]:
    """The token ids of `text`, or None when the tokenizer cannot represent it exactly."""
    try:
        ids = tok.encode(text)
    except (TypeError, ValueError):  # e.g. a lone surrogate, which has no UTF-8 bytes
        return None
    if not ids or tok.decode(ids) != text:
        return None
    return ids


# -- command line --------------------------------------------------------------------------

def _tokenizer(args, index: SearchIndex):
    from megatron_sc2.data.tokenizer import load_tokenizer

    path = args.tokenizer_model or index.manifest.get("tokenizer")
    if not path:
        raise ConfigError("--tokenizer-model: this index records no tokenizer; give the one of its datasets")
    return load_tokenizer(path)


def _query_ids(args, index: SearchIndex, tok) -> tuple[Optional[list[int]], Optional[str]]:
    if args.ids is not None:
        try:
            return [int(x) for x in args.ids.replace(",", " ").split()], None
        except ValueError:
            raise ConfigError(f"--ids {args.ids!r}: expected token ids separated by spaces") from None
    if args.text is None:
        raise ConfigError("give the text to search for (or --ids)")
    ids = encode_query(tok, args.text)
    return ids, None if ids is not None else "the tokenizer cannot represent this text exactly"


def _build_main(args) -> int:
    if args.submit_shards is not None:
        build_args = ["--data-path", *[str(Path(p).resolve()) for p in args.data_path],
                      "--output", str(Path(args.output).resolve())]
        if args.tokenizer_model:
            build_args += ["--tokenizer-model", str(Path(args.tokenizer_model).resolve())]
        if args.bm25:
            build_args.append("--bm25")
        return submit_main("search", args, build_args, [str(Path(args.output).resolve())])
    t0 = time.perf_counter()
    m = build(args.data_path, args.output, args.tokenizer_model, parse_shard(args.shard), args.shard_tokens,
              args.bm25)
    tokens = sum(s["tokens"] for s in m["shards"])
    print(f"search: indexed {tokens:,} tokens in {len(m['shards'])} shard(s) in {time.perf_counter() - t0:.1f} s "
          f"-> {args.output}", file=sys.stderr)
    return 0


def _merge_main(args) -> int:
    m = merge(args.output)
    print(f"search: {len(m['shards'])} shards -> {Path(args.output) / MANIFEST}", file=sys.stderr)
    return 0


def _count_main(args) -> int:
    index = SearchIndex(args.directory)
    tok = _tokenizer(args, index) if args.ids is None else None
    ids, note = _query_ids(args, index, tok)
    n = index.count_ids(ids) if ids is not None else 0
    if args.json:
        print(json.dumps({"count": n, "tokens": len(ids or []), **({"note": note} if note else {})}))
    else:
        print(n)
    return 0


def _find_main(args) -> int:
    index = SearchIndex(args.directory)
    tok = _tokenizer(args, index)
    if args.bm25:
        if args.text is None:
            raise ConfigError("--bm25: give the text to rank documents for")
        if args.limit < 0:
            raise ConfigError(f"--limit must be at least 0, got {args.limit}")
        matched, ranked = index.rank_bm25(args.text, args.limit)
        hits = index.describe_ranked(ranked, args.text, tok)
        if args.json:
            print(json.dumps({"count": matched, "hits": [h.__dict__ for h in hits]}))
            return 0
        print(f"{matched} document(s) hold a query term; best {len(hits)}:")
        for h in hits:
            print(f"--- {h.score:.3f}  {h.dataset} document {h.document}: {h.repository or '?'}/{h.path or '?'}")
            print(h.snippet)
        return 0
    ids, note = _query_ids(args, index, tok)
    if args.limit < 0:
        raise ConfigError(f"--limit must be at least 0, got {args.limit}")
    count, hits = index.find_ids(ids, args.limit) if ids is not None else (0, [])
    described = index.describe(hits, len(ids or []), tok, args.context)
    if args.json:
        print(json.dumps({"count": count, "hits": [h.__dict__ for h in described],
                          **({"note": note} if note else {})}))
        return 0
    print(f"{count} occurrence(s)" + (f" ({note})" if note else ""))
    for h in described:
        where = f"{h.repository or '?'}/{h.path or '?'}"
        print(f"--- {h.dataset} document {h.document} token {h.token_offset}: {where}")
        print(h.snippet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="megatron-sc2 search", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="index datasets (suffix arrays over their tokens)")
    b.add_argument("--data-path", nargs="+", required=True)
    b.add_argument("--output", required=True, help="index directory")
    b.add_argument("--tokenizer-model", default=None, help="recorded for queries (else give it to count/find)")
    b.add_argument("--shard", default=None, help="i/N: build only shard i of N (then `search merge`); auto: slurm array task")
    b.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard of a whole build")
    b.add_argument("--bm25", action="store_true", help="also index words for ranked search (`find --bm25`)")
    add_submit_flags(b)
    b.set_defaults(fn=_build_main)
    m = sub.add_parser("merge", help="write the manifest of shards built with --shard")
    m.add_argument("output")
    m.set_defaults(fn=_merge_main)
    for name, fn, help_ in (("count", _count_main, "exact number of occurrences"),
                            ("find", _find_main, "documents holding the text, with repository, path, snippet")):
        q = sub.add_parser(name, help=help_)
        q.add_argument("directory", help="index directory")
        q.add_argument("text", nargs="?", default=None)
        q.add_argument("--ids", default=None, help="search these token ids instead of a text")
        q.add_argument("--tokenizer-model", default=None, help="default: the one recorded at build")
        q.add_argument("--json", action="store_true")
        if name == "find":
            q.add_argument("--limit", type=int, default=10)
            q.add_argument("--context", type=int, default=24, help="tokens of snippet either side")
            q.add_argument("--bm25", action="store_true", help="rank documents by BM25 over words instead")
        q.set_defaults(fn=fn)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)
