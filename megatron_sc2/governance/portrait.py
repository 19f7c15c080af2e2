"""`megatron-sc2 portrait build|merge|query|info`: the membership test of Data Portraits
(Marone & Van Durme, NeurIPS 2023), which the StarCoder and StarCoder2 membership tests run.

Build: every text segment of every document (detokenized from `.bin/.idx`, so it is exactly
what was trained on) is normalized and cut into non-overlapping 50-character windows from its
start; each window goes into a Bloom filter. Query: every 50-character window of the normalized
query (stride 1) is tested; hits exactly 50 apart form chains (a miss ends one); the score is
the longest chain over the chain a fully contained text would give, (len - 49) / 50. Spans are
reported in the caller's original characters.

The filter's size is fixed before any window is seen, from an upper bound of the number of
windows every shard computes alike (the characters of each document's tokens / 50), or from
`--capacity`; so shards (`--shard i/N`, one slurm array task each) OR into the very filter a
single build writes.

`preprocess --portrait DIR` (`PreprocessPortrait`) builds the same file from the tokens it
writes, with the same routines (`document_windows`, `document_window_bound`, `filter_meta`), so
a large corpus is read once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from megatron_sc2.data.indexed import IndexedDataset, strip_suffix
from megatron_sc2.errors import CommandLineParser, ConfigError, DataError
from megatron_sc2.governance.bloom import (BitBuilder, BloomFilter, BloomParams, merge_filters, window_digests,
                                           write_filter)
from megatron_sc2.governance.corpus_text import TokenText
from megatron_sc2.governance.normalize import normalize, normalize_with_offsets
from megatron_sc2.governance.shards import add_submit_flags, document_ranges, parse_shard, submit_main

WINDOW = 50
FILTER_NAME = "portrait.bloom"
BATCH_WINDOWS = 1 << 16


def filter_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / FILTER_NAME


def shard_path(directory: str | os.PathLike, shard: int, num_shards: int) -> Path:
    return Path(directory) / "shards" / f"portrait-{shard:05d}-of-{num_shards:05d}.bloom"


def document_window_bound(lengths: np.ndarray, ids: np.ndarray) -> int:
    """The capacity share of one document: its tokens' characters (`TokenText.char_lengths`,
    ids past the table counted as its last entry) / 50. `window_bound` sums exactly this."""
    ids = np.minimum(np.asarray(ids, dtype=np.int64), len(lengths) - 1)
    return int(lengths[ids].sum()) // WINDOW


def window_bound(datasets: Sequence[IndexedDataset], text: TokenText, chunk: int = 1 << 24) -> int:
    """An upper bound of the windows a build inserts: per document, its tokens' characters / 50
    (`document_window_bound`, streamed over the `.bin`, memory flat)."""
    lengths = text.char_lengths()
    total = 0
    for ds in datasets:
        if not ds.num_tokens:
            continue
        starts = np.concatenate([[0], np.cumsum(ds.sequence_lengths, dtype=np.int64)])[ds.document_indices]
        prefix = np.zeros(len(starts), dtype=np.int64)  # characters before each document start
        running = 0
        for a in range(0, ds.num_tokens, chunk):
            ids = np.minimum(np.asarray(ds._bin_map[a:a + chunk], dtype=np.int64), len(lengths) - 1)
            c = np.cumsum(lengths[ids]) + running
            sel = (starts > a) & (starts <= a + len(ids))
            prefix[sel] = c[starts[sel] - a - 1]
            running = int(c[-1])
        total += int((np.diff(prefix) // WINDOW).sum())
    return total


def index_windows(segment: str) -> list[str]:
    """The non-overlapping windows a build inserts for one text segment."""
    s = normalize(segment)
    return [s[j:j + WINDOW] for j in range(0, len(s) - WINDOW + 1, WINDOW)]


def document_windows(text: TokenText, ids: np.ndarray) -> tuple[list[str], int]:
    """The windows one document's tokens put into the filter (each segment between special
    tokens normalized and cut from its start), and the normalized characters they came from.
    The one routine of both builds: from a finished dataset and during preprocessing."""
    windows: list[str] = []
    chars = 0
    for seg in text.segments(ids):
        s = normalize(seg)
        chars += len(s)
        windows.extend(s[j:j + WINDOW] for j in range(0, len(s) - WINDOW + 1, WINDOW))
    return windows, chars


def filter_meta(prefixes: Sequence[str], documents: int, tokenizer_path: str | os.PathLike) -> dict[str, Any]:
    """The header of a whole filter: the dataset prefixes as given, their document count and
    the (resolved) tokenizer; nothing that depends on how or in how many shards it was built."""
    return {"datasets": [strip_suffix(str(p)) for p in prefixes], "documents": int(documents),
            "tokenizer": str(tokenizer_path)}


@dataclass
class BuildReport:
    path: Path
    params: BloomParams
    documents: int
    windows: int
    characters: int
    seconds: float

    def line(self) -> str:
        rate = self.characters / 1e6 / self.seconds if self.seconds > 0 else float("inf")
        return (f"portrait: {self.documents:,} documents, {self.windows:,} windows ({self.characters / 1e6:.1f} M "
                f"normalized chars, {rate:.1f} M chars/s) into {self.params.num_bits:,} bits, "
                f"{self.params.num_hashes} hashes (capacity {self.params.capacity:,} at error rate "
                f"{self.params.error_rate:g}) -> {self.path}")


def _open_datasets(prefixes: Sequence[str]) -> list[IndexedDataset]:
    if not prefixes:
        raise ConfigError("--data-path: give at least one dataset prefix")
    return [IndexedDataset(strip_suffix(p)) for p in prefixes]


def build(prefixes: Sequence[str], tokenizer, output: str | os.PathLike, error_rate: float = 0.001,
          capacity: Optional[int] = None, shard: Optional[tuple[int, int]] = None) -> BuildReport:
    """Build the whole filter, or one shard of it (then `merge` joins the shards)."""
    from megatron_sc2.data.tokenizer import Tokenizer, load_tokenizer

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    t0 = time.perf_counter()
    datasets = _open_datasets(prefixes)
    text = TokenText(tok)
    if capacity is not None and capacity < 1:
        raise ConfigError(f"--capacity must be at least 1, got {capacity}")
    params = BloomParams.for_capacity(capacity or window_bound(datasets, text), error_rate, WINDOW)
    builder = BitBuilder(params)
    i, n = shard or (0, 1)
    docs = chars = 0
    pending: list[str] = []
    for di, first, end in document_ranges(datasets, i, n):
        ds = datasets[di]
        for d in range(first, end):
            windows, c = document_windows(text, ds.document(d))
            pending.extend(windows)
            chars += c
            docs += 1
            if len(pending) >= BATCH_WINDOWS:
                builder.add_digests(window_digests(pending))
                pending = []
    builder.add_digests(window_digests(pending))
    meta = filter_meta([d.prefix for d in datasets], sum(d.num_documents for d in datasets), tok.path)
    if shard:
        meta.update(shard=[i, n], windows=builder.inserted)
    out = shard_path(output, i, n) if shard else filter_path(output)
    write_filter(out, params, builder.packed(), meta)
    return BuildReport(out, params, docs, builder.inserted, chars, time.perf_counter() - t0)


class PreprocessPortrait:
    """The portrait `preprocess --portrait DIR` writes of the documents it writes: the same
    windows (`document_windows` of each document's tokens, as in the `.bin`) and the same
    capacity (`document_window_bound` summed) as `portrait build` over the finished dataset, so
    the very same file, byte for byte. Window digests go to a temporary file as documents are
    written (the capacity is known only at the end); `stage` sizes the filter and inserts them.
    It is a companion of the last output pair: staged and renamed with it, aborted with it."""

    def __init__(self, directory: str | os.PathLike, error_rate: float = 0.001):
        BloomParams.for_capacity(1, error_rate, WINDOW)  # a bad rate fails before any work
        self.directory = Path(directory)
        self.error_rate = error_rate
        self.path = filter_path(self.directory)
        self._tmp_digests = self.directory / f"{FILTER_NAME}.digests.tmp-{os.getpid()}"
        self._tmp_filter = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        self._f = None
        self.capacity = 0
        self.windows = 0
        self.documents = 0

    def open(self, prefixes: Sequence[str], tok) -> None:
        """Before the first document: the outputs this portrait describes, and their tokenizer."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._f = open(self._tmp_digests, "wb")
        except OSError as e:
            raise DataError(f"--portrait {self.directory}: cannot write there ({e.strerror or e})") from None
        self.prefixes = [str(p) for p in prefixes]
        self.tokenizer_path = tok.path
        self.text = TokenText(tok)
        self.lengths = self.text.char_lengths()

    def prepare(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        """(window digests, capacity share) of one document's tokens; runs in the encoder threads."""
        windows, _ = document_windows(self.text, ids)
        return window_digests(windows), document_window_bound(self.lengths, ids) if len(ids) else 0

    def add(self, prepared: tuple[np.ndarray, int]) -> None:
        """One written document, in order (the writer thread)."""
        digests, bound = prepared
        self._f.write(np.ascontiguousarray(digests, dtype="<u8").tobytes())
        self.capacity += bound
        self.windows += len(digests)
        self.documents += 1

    def stage(self) -> tuple[Path, Path]:
        self._f.flush()
        self._f.close()
        params = BloomParams.for_capacity(self.capacity, self.error_rate, WINDOW)
        builder = BitBuilder(params)
        step = BATCH_WINDOWS * 16
        with open(self._tmp_digests, "rb") as f:
            while chunk := f.read(step):
                builder.add_digests(np.frombuffer(chunk, dtype="<u8").reshape(-1, 2))
        self._tmp_digests.unlink()
        write_filter(self._tmp_filter, params, builder.packed(),
                     filter_meta(self.prefixes, self.documents, self.tokenizer_path))
        return self._tmp_filter, self.path

    def abort(self) -> None:
        if self._f is not None and not self._f.closed:
            try:
                self._f.close()
            except OSError:
                pass
        for p in (self._tmp_digests, self._tmp_filter):
            p.unlink(missing_ok=True)


def _final_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The header of a whole filter (single build or merged shards): no shard, no counts that
    depend on how it was built."""
    return {k: v for k, v in meta.items() if k not in ("shard", "windows")}


def merge(output: str | os.PathLike, num_shards: Optional[int] = None) -> Path:
    """OR the shards under OUTPUT/shards into OUTPUT/portrait.bloom; every shard must be there."""
    from megatron_sc2.governance.bloom import read_header

    shards = sorted((Path(output) / "shards").glob("portrait-*-of-*.bloom"))
    if not shards:
        raise DataError(f"{Path(output) / 'shards'}: no portrait shards to merge")
    counts = {int(p.stem.split("-of-")[1]) for p in shards}
    if len(counts) != 1 or (num_shards is not None and counts != {num_shards}):
        raise DataError(f"{Path(output) / 'shards'}: shards of different builds ({sorted(counts)} shards each); "
                        "remove the stale ones")
    n = counts.pop()
    missing = [shard_path(output, i, n) for i in range(n) if not shard_path(output, i, n).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: missing ({len(missing)} of {n} shards not built yet)")
    metas = [read_header(p)[1] for p in shards]
    base = _final_meta(metas[0])
    for p, m in zip(shards, metas):
        if _final_meta(m) != base:
            raise DataError(f"{p}: portrait shard of other datasets or tokenizer than {shards[0]}")
    return merge_filters(shards, filter_path(output), base)


# -- query ---------------------------------------------------------------------------------

@dataclass
class Chain:
    start: int        # in the caller's characters
    end: int
    length: int       # windows


@dataclass
class QueryResult:
    longest_chain: int
    expected_chain: float
    score: float
    spans: list[list[int]]
    chains: list[Chain] = field(default_factory=list)
    windows: int = 0
    hits: int = 0
    normalized_length: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["chains"] = [[c["start"], c["end"], c["length"]] for c in d["chains"]]
        return d


def chain_lengths(hits: np.ndarray) -> np.ndarray:
    """chain[j] = hits[j] * (chain[j - 50] + 1): the length of the chain ending at window j."""
    out = np.zeros(len(hits), dtype=np.int64)
    for r in range(min(WINDOW, len(hits))):
        col = hits[r::WINDOW].astype(np.int64)
        # run lengths of ones within this residue class
        c = np.cumsum(col)
        reset = np.maximum.accumulate(np.where(col == 0, c, 0))
        out[r::WINDOW] = c - reset
    return out


def query_text(bf: BloomFilter, text: str, min_chain: int = 1) -> QueryResult:
    norm, offsets = normalize_with_offsets(text)
    nwin = max(len(norm) - WINDOW + 1, 0)
    expected = (len(norm) - WINDOW + 1) / WINDOW if nwin else 0.0
    if not nwin:
        return QueryResult(0, 0.0, 0.0, [], [], 0, 0, len(norm))
    hits = bf.contains([norm[j:j + WINDOW] for j in range(nwin)])
    chain = chain_lengths(hits)
    longest = int(chain.max())
    # a chain ends at j when the next window of its residue class (j + 50) is not part of it
    nxt = np.zeros(nwin, dtype=np.int64)
    nxt[:-WINDOW] = chain[WINDOW:] if nwin > WINDOW else nxt[:0]
    ends = np.flatnonzero((chain >= max(min_chain, 1)) & (nxt == 0))
    chains = []
    for j in ends.tolist():
        c = int(chain[j])
        a, b = j - WINDOW * (c - 1), j + WINDOW  # normalized [a, b)
        chains.append(Chain(int(offsets[a]), int(offsets[b - 1]) + 1, c))
    chains.sort(key=lambda ch: (ch.start, ch.end))
    spans: list[list[int]] = []
    for ch in chains:
        if spans and ch.start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], ch.end)
        else:
            spans.append([ch.start, ch.end])
    return QueryResult(longest, expected, longest / expected, spans, chains, nwin, int(hits.sum()), len(norm))


# -- command line --------------------------------------------------------------------------

def _build_main(args: argparse.Namespace) -> int:
    if args.submit_shards is not None:
        build_args = ["--data-path", *[str(Path(p).resolve()) for p in args.data_path],
                      "--tokenizer-model", str(Path(args.tokenizer_model).resolve()),
                      "--output", str(Path(args.output).resolve()), "--error-rate", repr(args.error_rate)]
        if args.capacity is not None:
            build_args += ["--capacity", str(args.capacity)]
        return submit_main("portrait", args, build_args,
                           [str(Path(args.output).resolve()), "--num-shards", str(args.submit_shards)])
    shard = parse_shard(args.shard)
    report = build(args.data_path, args.tokenizer_model, args.output, args.error_rate, args.capacity, shard)
    print(report.line(), file=sys.stderr)
    return 0


def _merge_main(args: argparse.Namespace) -> int:
    path = merge(args.output, args.num_shards)
    bf = BloomFilter.open(path)
    print(f"portrait: merged shards into {path} ({bf.params.num_bits:,} bits)", file=sys.stderr)
    return 0


def _read_query(source: str) -> str:
    if source == "-":
        data = sys.stdin.buffer.read()
        where = "standard input"
    else:
        p = Path(source)
        if not p.is_file():
            raise DataError(f"{p}: query file not found")
        data, where = p.read_bytes(), str(p)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None


def _query_main(args: argparse.Namespace) -> int:
    bf = BloomFilter.open(filter_path(args.directory))
    res = query_text(bf, _read_query(args.file), args.min_chain)
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        print(f"longest chain {res.longest_chain} of {res.expected_chain:.2f} expected: score {res.score:.3f} "
              f"({res.hits} of {res.windows} windows hit)")
        for a, b in res.spans:
            print(f"  span [{a}, {b})")
    return 0


def _info_main(args: argparse.Namespace) -> int:
    bf = BloomFilter.open(filter_path(args.directory))
    p = bf.params
    info = {"path": str(bf.path), **asdict(p), **bf.meta, "bytes": p.num_bits // 8,
            "fill_ratio": bf.fill_ratio()}
    info["false_positive_rate_at_fill"] = info["fill_ratio"] ** p.num_hashes
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="megatron-sc2 portrait", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build the filter (or one shard of it) from datasets")
    b.add_argument("--data-path", nargs="+", required=True, help="dataset prefixes (PREFIX.bin / .idx)")
    b.add_argument("--tokenizer-model", required=True, help="the tokenizer the datasets were made with")
    b.add_argument("--output", required=True, help="portrait directory")
    b.add_argument("--error-rate", type=float, default=0.001, help="false-positive rate at capacity")
    b.add_argument("--capacity", type=int, default=None,
                   help="windows the filter is sized for (default: an upper bound from the datasets)")
    b.add_argument("--shard", default=None, help="i/N: build only shard i of N (0-based); auto: slurm array task")
    add_submit_flags(b)
    b.set_defaults(fn=_build_main)
    m = sub.add_parser("merge", help="OR the shards of DIR/shards into DIR/portrait.bloom")
    m.add_argument("output", help="portrait directory")
    m.add_argument("--num-shards", type=int, default=None, help="expected number of shards")
    m.set_defaults(fn=_merge_main)
    q = sub.add_parser("query", help="how much of a text is in the portrait")
    q.add_argument("directory", help="portrait directory")
    q.add_argument("file", nargs="?", default="-", help="text file to test (default: standard input)")
    q.add_argument("--json", action="store_true", help="one JSON object: longest_chain, expected_chain, score, spans")
    q.add_argument("--min-chain", type=int, default=1, help="shortest chain (in windows) reported as a span")
    q.set_defaults(fn=_query_main)
    i = sub.add_parser("info", help="the filter's parameters and fill")
    i.add_argument("directory")
    i.set_defaults(fn=_info_main)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)
