"""Benchmarks of `megatron-sc2 clean` (recorded in bench/RESULTS.md).

1. MinHash signatures per second on one core, side by side on the same CPython stdlib files and
   250 permutations: ours (numpy) vs what a user would write with datasketch (BigCode's 5-word
   shingles, `MinHash(num_perm=250).update_batch`) vs datatrove's `MinhashDedupSignature`
   (its own tokenizer and 25 x 10 buckets) where it imports; best of 3 interleaved rounds each.
2. The whole `clean --all` of the stdlib on this machine (all cores): time and peak memory.
3. The same as 4 shards through the local slurm (`--slurm 4`), submission to report.json.

    python bench/clean.py [--files N] [--skip-slurm]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _stdlib_texts(limit: int) -> list[str]:
    from megatron_sc2.data.prep.corpus import iter_stdlib_repositories

    texts = [t for _, files in iter_stdlib_repositories() for _, t in files]
    return texts[:limit] if limit else texts


def _ours(texts: list[str]) -> None:
    from megatron_sc2.data.prep.clean.minhash import MinHasher

    mh = MinHasher()
    for text in texts:
        mh.signature(text)


def _datasketch(texts: list[str]) -> None:
    from datasketch import MinHash

    split = re.compile(r"\W")
    for text in texts:
        words = split.split(text.lower())
        shingles = {" ".join(words[i:i + 5]) for i in range(len(words) - 4)}
        m = MinHash(num_perm=250)
        m.update_batch([s.encode("utf-8") for s in shingles])


def _datatrove(texts: list[str]) -> None:
    """datatrove's signature stage (its text simplification, shingle hashing and permutations),
    with BigCode's split as the word tokenizer (its English one needs spacy, not installed)."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class BigCodeSplit(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return re.split(r"\W", text.lower())

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    with tempfile.TemporaryDirectory() as d:
        cfg = MinhashConfig(n_grams=5, num_buckets=25, hashes_per_bucket=10,
                            hash_config=HashConfig(precision=32, hash_fc="sha1"))  # its xxhash path fails on str
        step = MinhashDedupSignature(d, config=cfg,
                                     language=BigCodeSplit())
        for text in texts:
            sh = step.get_shingles(text)
            if sh.size:
                step.get_signature(sh)


def bench_minhash(texts: list[str], rounds: int = 3) -> dict:
    """Best of `rounds` interleaved runs of each (the machine is shared: the minimum is the
    least disturbed run)."""
    runs = {"ours": _ours, "datasketch": _datasketch, "datatrove": _datatrove}
    best: dict[str, float] = {}
    out: dict = {"files": len(texts), "mb": sum(map(len, texts)) / 1e6}
    for name, fn in list(runs.items()):
        try:
            fn(texts[:2])  # imports and warm caches outside the timing
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"
            runs.pop(name)
    for _ in range(rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn(texts)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    out.update({f"{k}_s": v for k, v in best.items()})
    return out


def _write_stdlib(root: Path) -> None:
    from megatron_sc2.demo import write_corpus

    write_corpus(root)


def bench_whole(root: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "megatron_sc2.cli", "clean", "--input", str(root), "--output", str(out),
           "--all", "--workers", str(workers)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    sec = time.perf_counter() - t
    report = json.loads((out / "report.json").read_text())
    return {"seconds": sec, "workers": workers, "report": report}


def bench_slurm(root: Path, out: Path) -> dict:
    from megatron_sc2.launch import slurm

    why = slurm.unavailable()
    if why:
        return {"skipped": why}
    cmd = [sys.executable, "-m", "megatron_sc2.cli", "clean", "--input", str(root), "--output", str(out),
           "--all", "--slurm", "4"]
    t = time.perf_counter()
    r = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    ids = re.findall(r"(?:array|job) (\d+)", r.stderr)
    while subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True, text=True).stdout.strip():
        time.sleep(0.5)
    sec = time.perf_counter() - t
    ok = (out / "report.json").is_file()
    return {"seconds": sec, "completed": ok, "report": json.loads((out / "report.json").read_text()) if ok else None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=0, help="stdlib files for the MinHash comparison (0: all)")
    ap.add_argument("--skip-slurm", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "stdlib"
        _write_stdlib(root)
        w = bench_whole(root, Path(d) / "out", os.cpu_count() or 1)
        r = w["report"]
        print(f"clean --all of the stdlib ({r['input']['files']} files, {r['input']['input_bytes'] / 1e6:.1f} MB), "
              f"{w['workers']} workers: {w['seconds']:.1f} s, peak RSS {r['resources']['shard_peak_rss_mb_max']:.0f} MB "
              f"per shard process, {r['resources']['merge_peak_rss_mb']:.0f} MB merging; removed {r['removed_total']} ({json.dumps(r['removed'])}), "
              f"redacted {json.dumps(r['redacted'])}", flush=True)
        if not args.skip_slurm:
            s = bench_slurm(root, Path(d) / "slurm")
            if "skipped" in s:
                print(f"slurm: skipped ({s['skipped']})")
            else:
                same = s["completed"] and s["report"]["removed"] == r["removed"] and s["report"]["output"]["files"] == r["output"]["files"]
                print(f"clean --all --slurm 4 (local one-host slurm): {s['seconds']:.1f} s from submission to the "
                      f"merged report; same counts as the one-machine run: {same}")
    # last: the MinHash comparison grows this process, and a child started later would
    # report this process's peak memory as its own
    m = bench_minhash(_stdlib_texts(args.files))
    line = (f"MinHash, 1 core, {m['files']} stdlib files ({m['mb']:.1f} MB), 250 permutations: ours {m['ours_s']:.2f} s "
            f"({m['files'] / m['ours_s']:.0f} files/s), datasketch {m['datasketch_s']:.2f} s "
            f"({m['files'] / m['datasketch_s']:.0f} files/s): ratio {m['datasketch_s'] / m['ours_s']:.1f}x")
    if "datatrove_s" in m:
        line += f"; datatrove {m['datatrove_s']:.2f} s: ratio {m['datatrove_s'] / m['ours_s']:.1f}x"
    else:
        line += f"; datatrove: {m.get('datatrove_error')}"
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
