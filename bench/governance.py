#!/usr/bin/env python
"""Membership test and corpus search: speed and size, each beside what a user would do instead.

Corpus: the interpreter's standard library as repository documents (StarCoder2 tokenizer), and
for search also the same tokens repeated to >= 100M (synthetic repeats: size, not content).

- portrait: build throughput (M characters of text per second, one process = one core), size
  (bytes per character of text), query latency of a 500-character request through the HTTP
  server (POST /overlap, a fresh connection per request, as the extension sends them), measured
  false-positive rate on text not in the corpus against the configured one; beside an exact
  Python set of the same windows (size and lookup).
- search: build time per million tokens, index bytes per token, `count` latency on random
  n-grams from the corpus (index opened once, as a server would), beside a brute-force numpy scan
  of the `.bin` (what one does without an index).

    .venv/bin/python bench/governance.py --work /tmp/govbench [--big-tokens 100000000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "starcoder2-reconstructed" / "tokenizer.json"


def ms(xs):
    xs = sorted(xs)
    return f"median {1e3 * statistics.median(xs):.2f} ms, p95 {1e3 * xs[int(0.95 * (len(xs) - 1))]:.2f} ms"


def make_corpus(work: Path, tok) -> str:
    from megatron_sc2.data.prep.corpus import iter_stdlib_repositories
    from megatron_sc2.data.prep.preprocess import preprocess

    prefix = work / "stdlib"
    if not Path(str(prefix) + "_text_document.idx").is_file():
        preprocess(str(prefix), tok, repositories=iter_stdlib_repositories(), workers=2, progress=False)
    return str(prefix) + "_text_document"


def bench_portrait(work: Path, data: str, tok, requests: int) -> None:
    from megatron_sc2.data.indexed import IndexedDataset
    from megatron_sc2.governance import portrait
    from megatron_sc2.governance.bloom import BloomFilter
    from megatron_sc2.governance.corpus_text import TokenText
    from megatron_sc2.governance.normalize import normalize
    from megatron_sc2.governance.serve import make_server

    out = work / "portrait"
    rep = portrait.build([data], tok, out, error_rate=0.001)
    bf = BloomFilter.open(portrait.filter_path(out))
    ds = IndexedDataset(data)
    text = TokenText(tok)
    segments = [s for d in range(ds.num_documents) for s in text.segments(ds.document(d))]
    raw_chars = sum(len(s) for s in segments)
    size = portrait.filter_path(out).stat().st_size
    print(f"portrait build: {rep.characters / 1e6:.1f} M normalized chars ({raw_chars / 1e6:.1f} M raw) of "
          f"{rep.documents} documents in {rep.seconds:.2f} s = {raw_chars / 1e6 / rep.seconds:.1f} M raw chars/s "
          f"on one core; {rep.windows:,} windows, capacity bound {rep.params.capacity:,}")
    print(f"portrait size: {size / 1e6:.2f} MB = {size / raw_chars:.4f} bytes per raw char "
          f"({100 * size / raw_chars:.1f}% of the text; {100 * size / rep.characters:.1f}% of the normalized text)")

    t0 = time.perf_counter()
    exact = {w for s in segments for w in portrait.index_windows(s)}
    t_set = time.perf_counter() - t0
    set_bytes = sum(sys.getsizeof(w) for w in exact) + sys.getsizeof(exact)
    print(f"  beside an exact Python set of the windows: {set_bytes / 1e6:.1f} MB in memory ({set_bytes / size:.0f}x "
          f"the filter), built in {t_set:.2f} s")

    # false positives: windows of text that is surely not in the corpus
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_ (){}=+-*/"
    probe = ["".join(rng.choice(alphabet) for _ in range(50)) for _ in range(200_000)]
    probe = [p for p in probe if p not in exact]
    fpr = float(bf.contains(probe).mean())
    fill = bf.fill_ratio()
    print(f"false-positive rate on {len(probe):,} new windows: {fpr:.5f} (configured {bf.params.error_rate}, "
          f"expected at this fill {fill ** bf.params.num_hashes:.5f}; ratio measured/configured {fpr / bf.params.error_rate:.2f})")
    exact_out = work / "portrait-exact"
    portrait.build([data], tok, exact_out, error_rate=0.001, capacity=len(exact))
    bfe = BloomFilter.open(portrait.filter_path(exact_out))
    fpr_e = float(bfe.contains(probe).mean())
    print(f"  sized for exactly the {len(exact):,} distinct windows (--capacity): {bfe.params.num_bits // 8 / raw_chars:.4f} "
          f"bytes per raw char ({100 * bfe.params.num_bits / 8 / raw_chars:.1f}%), false-positive rate {fpr_e:.5f} = "
          f"{fpr_e / bfe.params.error_rate:.2f}x the configured {bfe.params.error_rate}")

    # 500-character requests through the server, fresh connection each
    docs = [s for s in segments if len(s) > 2000]
    bodies = []
    for _ in range(requests):
        s = rng.choice(docs)
        a = rng.randrange(len(s) - 500)
        bodies.append(json.dumps({"document": s[a:a + 500]}))
    server = make_server(str(out), "127.0.0.1", 0)
    th = threading.Thread(target=server.serve_forever, daemon=True)
    th.start()
    host, port = server.server_address[:2]
    lat, spans = [], 0
    for body in bodies:
        t0 = time.perf_counter()
        c = http.client.HTTPConnection(host, port, timeout=10)
        c.request("POST", "/overlap", body, {"Content-Type": "application/json"})
        r = json.loads(c.getresponse().read())
        c.close()
        lat.append(time.perf_counter() - t0)
        spans += len(r["spans"]) > 0
    server.shutdown()
    server.server_close()
    inproc = []
    for body in bodies[:200]:
        t0 = time.perf_counter()
        portrait.query_text(bf, json.loads(body)["document"])
        inproc.append(time.perf_counter() - t0)
    set_lat = []
    for body in bodies[:200]:
        t0 = time.perf_counter()
        n = normalize(json.loads(body)["document"])
        [n[j:j + 50] in exact for j in range(len(n) - 49)]
        set_lat.append(time.perf_counter() - t0)
    print(f"POST /overlap, 500 chars from the corpus ({len(bodies)} requests, {spans} with spans): {ms(lat)} "
          f"(target < 5 ms); in-process query {ms(inproc)}; exact-set lookup of the same windows {ms(set_lat)}")


def bench_search(work: Path, data: str, tok, name: str, queries: int, shard_tokens: int) -> None:
    from megatron_sc2.data.indexed import IndexedDataset
    from megatron_sc2.governance import search

    out = work / f"search-{name}"
    ds = IndexedDataset(data)
    t0 = time.perf_counter()
    search.build([data], out, str(tok.path), shard_tokens=shard_tokens)
    t_build = time.perf_counter() - t0
    index = search.SearchIndex(out)
    size = sum(p.stat().st_size for p in out.glob("*.bin"))
    print(f"search build ({name}): {ds.num_tokens / 1e6:.1f} M tokens in {len(index.shards)} shard(s), "
          f"{t_build:.1f} s = {t_build / (ds.num_tokens / 1e6):.2f} s per M tokens; index {size / 1e6:.0f} MB = "
          f"{size / ds.num_tokens:.2f} bytes per token (tokens 2 + suffix array 4, with separators)")
    rng = np.random.default_rng(0)
    bin_ = np.asarray(ds._bin_map)
    qs = []
    for _ in range(queries):
        n = int(rng.integers(2, 9))
        a = int(rng.integers(0, ds.num_tokens - n))
        qs.append(np.asarray(bin_[a:a + n]))
    lat, counts = [], []
    for q in qs:
        t0 = time.perf_counter()
        counts.append(index.count_ids(q))
        lat.append(time.perf_counter() - t0)
    texts = [tok.decode(q.tolist()) for q in qs[:100]]
    tlat = []
    for t in texts:
        t0 = time.perf_counter()
        ids = search.encode_query(tok, t)
        if ids:
            index.count_ids(ids)
        tlat.append(time.perf_counter() - t0)
    flat = []
    for q in qs[:50]:
        t0 = time.perf_counter()
        _, hits = index.find_ids(q, limit=10)
        index.describe(hits, len(q), tok)
        flat.append(time.perf_counter() - t0)
    brute = []
    for q in qs[:5]:
        t0 = time.perf_counter()
        m = bin_[: len(bin_) - len(q) + 1] == q[0]
        for k in range(1, len(q)):
            m &= bin_[k: len(bin_) - len(q) + 1 + k] == q[k]
        int(m.sum())
        brute.append(time.perf_counter() - t0)
    print(f"  count of {len(qs)} random 2-8-grams (median count {int(np.median(counts))}): {ms(lat)} (target < 20 ms); "
          f"text query incl. tokenizing {ms(tlat)}; find --limit 10 with snippets {ms(flat)}")
    print(f"  beside a brute-force numpy scan of the .bin: {ms(brute)} = "
          f"{statistics.median(brute) / statistics.median(lat):.0f}x the indexed count")
    if name == "stdlib":
        t0 = time.perf_counter()
        search.build([data], work / "search-bm25", str(tok.path), shard_tokens=shard_tokens, with_bm25=True)
        t_bm = time.perf_counter() - t0 - t_build
        bm = search.SearchIndex(work / "search-bm25")
        words = ["json", "decode", "error", "socket", "thread", "lock", "parse", "args", "path", "open", "read"]
        r = random.Random(1)
        blat = []
        for _ in range(100):
            q = " ".join(r.sample(words, 3))
            t0 = time.perf_counter()
            bm.rank_bm25(q, 10)
            blat.append(time.perf_counter() - t0)
        bsize = sum(p.stat().st_size for p in (work / "search-bm25").glob("bm25-*"))
        print(f"  BM25 (--bm25): about {t_bm:.1f} s more to build, {bsize / 1e6:.1f} MB; ranked 3-word queries, "
              f"top 10 (first one opens the vocabulary): {ms(blat)}")


def big_dataset(work: Path, data: str, tokens: int) -> str:
    from megatron_sc2.data.indexed import IndexedDataset, IndexedWriter

    ds = IndexedDataset(data)
    copies = -(-tokens // ds.num_tokens)
    out = work / f"big{copies}_text_document"
    if not Path(str(out) + ".idx").is_file():
        with IndexedWriter(out, ds.dtype) as w:
            for _ in range(copies):
                w.add_index(ds)
            w.finalize()
    return str(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/govbench")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--big-tokens", type=int, default=100_000_000, help="0: skip the large corpus")
    p.add_argument("--big-shard-tokens", type=int, default=60_000_000)
    p.add_argument("--skip-portrait", action="store_true")
    args = p.parse_args()
    from megatron_sc2.data.tokenizer import load_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(args.tokenizer)
    data = make_corpus(work, tok)
    if not args.skip_portrait:
        bench_portrait(work, data, tok, args.requests)
    bench_search(work, data, tok, "stdlib", args.queries, 500_000_000)
    if args.big_tokens:
        bench_search(work, big_dataset(work, data, args.big_tokens), tok, "big", args.queries, args.big_shard_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
