#!/usr/bin/env python
"""Preprocessing throughput: ours against Megatron-LM's tools/preprocess_data.py.

Same corpus (the interpreter's standard library as JSON lines, one file per line), same
tokenizer (a Hugging Face directory, the StarCoder2 one by default), same worker count, same
flags (`--json-keys text --append-eod`). Both run as the command a user types (start-up
included), wall clock. The outputs must be byte-identical; the ratio is printed.

    MEGATRON_LM_DIR=/path/to/Megatron-LM python bench/preprocess.py --workers 2

The stdlib holds special-token text (`<NAME>` in gettext.py). Megatron's tool turns it into the
control token; ours keeps it as text unless `--parse-special-tokens` is given, so our runs
compared byte for byte with Megatron's pass that flag, and a default run is timed beside them.

    python bench/preprocess.py --baseline-tree /path/to/older/checkout --repeat 3

instead times this tree's tool against another checkout's, interleaved (no Megatron needed):
the check that a change did not slow the fast path down.

    python bench/preprocess.py --portrait --repeat 3

instead times `--portrait DIR` (the membership portrait written while preprocessing) against
what a user runs otherwise: preprocess, then `portrait build` over its output; interleaved, and
checks that both portraits are the same file and that the flag leaves the dataset unchanged.

Megatron-LM (tag core_v0.16.1) is not a dependency: it is run from its own source tree for
this bench only. Its training package imports `six` and `triton` at start-up; if they are
not in this environment, point `--extra-pythonpath` at a directory that has them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "starcoder2-reconstructed"


def write_corpus(path: Path) -> tuple[int, int]:
    from megatron_sc2.data.prep.corpus import iter_stdlib_repositories

    n = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for _, files in iter_stdlib_repositories():
            for _, text in files:
                if not text:
                    continue  # an empty file is a document Megatron keeps and we refuse
                f.write(json.dumps({"text": text}) + "\n")
                n += 1
    os.replace(tmp, path)
    return n, path.stat().st_size


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return dt


def bench_indices(tokens: int, seq_length: int, epochs: int) -> int:
    """Document/sample/shuffle index building for a synthetic dataset of `tokens` tokens:
    ours (vectorized) against megatron-core's GPTDataset steps (its C++ sample index)."""
    import warnings

    import numpy as np

    from megatron_sc2.data.gpt_dataset import SampleSpec, build_indices

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 2000, size=int(tokens // 1000)).astype(np.int32)
    total = int(sizes.sum(dtype=np.int64))
    n = epochs * total // seq_length - 1
    spec = SampleSpec("bench", "train", 0, len(sizes), n, seq_length, 1234)
    t0 = time.perf_counter()
    ours = build_indices(sizes, spec)
    t_ours = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers
        from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index
    t0 = time.perf_counter()
    num_epochs = ours[0].shape[0] // len(sizes)
    state = np.random.RandomState(1234)
    sep = num_epochs > 1 and (n - ((num_epochs - 1) * total - 1) // seq_length) < int(0.8 * ((total - 1) // seq_length))
    doc_idx = _build_document_index(np.arange(len(sizes), dtype=np.int32), num_epochs, state, sep)
    sample_idx = helpers.build_sample_idx(sizes, doc_idx, seq_length, num_epochs, total, True, True)
    m = sample_idx.shape[0] - 1
    sans = ((num_epochs - 1) * total - 1) // seq_length
    shuffle = _build_shuffle_index(sans if sep else m, m, state)
    t_meg = time.perf_counter() - t0
    same = all(np.array_equal(a, b) for a, b in zip(ours, (doc_idx, sample_idx, shuffle)))
    print(f"indices for {total / 1e9:.2f}B tokens, seq {seq_length}, {num_epochs} epoch(s), {m:,} samples: "
          f"ours {t_ours:.2f} s, megatron-core {t_meg:.2f} s (ratio {t_meg / t_ours:.2f}x), identical: "
          f"{'yes' if same else 'NO'}")
    return 0 if same else 1


def prepare_inputs(args) -> tuple[Path, Path, int, int, Path]:
    """The output folder, the stdlib corpus as JSON lines written into it, its document count
    and size, and the tokenizer saved there as a HF directory (what every mode runs on)."""
    from megatron_sc2.data.tokenizer import load_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "stdlib.jsonl"
    docs, size = write_corpus(corpus)
    tok_dir = out / "tokenizer"
    load_tokenizer(args.tokenizer).save_hf(tok_dir)
    return out, corpus, docs, size, tok_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--indices", type=float, default=None, metavar="TOKENS",
                   help="instead: time sample-index building for a synthetic dataset of TOKENS tokens")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--megatron-lm-dir", default=os.environ.get("MEGATRON_LM_DIR"))
    p.add_argument("--extra-pythonpath", default=os.environ.get("MEGATRON_EXTRA_PYTHONPATH", ""))
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "preprocess"))
    p.add_argument("--repeat", type=int, default=1, help="runs of each tool; the best time is kept")
    p.add_argument("--baseline-tree", default=None,
                   help="instead: time this tree's tool against the one in this checkout, interleaved")
    p.add_argument("--portrait", action="store_true",
                   help="instead: time preprocess --portrait against preprocess + portrait build, interleaved")
    args = p.parse_args()
    if args.portrait:
        return bench_portrait(args)
    if args.indices:
        return bench_indices(int(args.indices), args.seq_length, args.epochs)
    if args.baseline_tree:
        return bench_against_tree(args)
    if not args.megatron_lm_dir or not (Path(args.megatron_lm_dir) / "tools" / "preprocess_data.py").is_file():
        raise SystemExit("set MEGATRON_LM_DIR (or --megatron-lm-dir) to a Megatron-LM source tree (tag core_v0.16.1)")
    out, corpus, docs, size, tok_dir = prepare_inputs(args)
    print(f"corpus: {docs} files of the Python {sys.version.split()[0]} standard library, "
          f"{size / 1e6:.2f} MB of JSON lines; tokenizer {args.tokenizer}; workers {args.workers}; "
          f"cpus {os.cpu_count()}")

    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    meg_env = dict(env, PYTHONPATH=os.pathsep.join(x for x in [args.megatron_lm_dir, args.extra_pythonpath] if x))
    common = ["--input", str(corpus), "--json-keys", "text", "--append-eod", "--workers", str(args.workers)]
    meg_cmd = [sys.executable, str(Path(args.megatron_lm_dir) / "tools" / "preprocess_data.py"), *common,
               "--output-prefix", str(out / "megatron"), "--tokenizer-type", "HuggingFaceTokenizer",
               "--tokenizer-model", str(tok_dir)]
    our_cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), *common,
               "--output-prefix", str(out / "ours"), "--tokenizer-model", str(tok_dir), "--no-progress",
               "--parse-special-tokens"]
    hf_cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), *common,
              "--output-prefix", str(out / "ours_hf"), "--tokenizer-model", str(tok_dir), "--no-progress",
              "--no-fast-encoder", "--parse-special-tokens"]
    default_cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), *common,
                   "--output-prefix", str(out / "ours_default"), "--tokenizer-model", str(tok_dir), "--no-progress"]
    times: dict[str, float] = {}
    for name, cmd in (("megatron", meg_cmd), ("ours", our_cmd), ("ours_hf", hf_cmd), ("ours_default", default_cmd)):
        times[name] = min(timed(cmd, meg_env if name == "megatron" else env) for _ in range(args.repeat))
    identical = all(
        (out / f"megatron_text_document{e}").read_bytes() == (out / f"{n}_text_document{e}").read_bytes()
        for e in (".bin", ".idx") for n in ("ours", "ours_hf"))
    mb = size / 1e6
    print(f"{'tool':<40} {'seconds':>8} {'MB/s':>7}")
    print(f"{'Megatron-LM tools/preprocess_data.py':<40} {times['megatron']:8.2f} {mb / times['megatron']:7.2f}")
    print(f"{'ours (tiktoken exact encoder)':<40} {times['ours']:8.2f} {mb / times['ours']:7.2f}")
    print(f"{'ours --no-fast-encoder (tokenizers)':<40} {times['ours_hf']:8.2f} {mb / times['ours_hf']:7.2f}")
    print(f"{'ours, default (special text as text)':<40} {times['ours_default']:8.2f} "
          f"{mb / times['ours_default']:7.2f}")
    print(f"speed-up over Megatron-LM: {times['megatron'] / times['ours']:.2f}x "
          f"(tokenizers path: {times['megatron'] / times['ours_hf']:.2f}x)")
    print(f"outputs byte-identical to Megatron-LM's: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


def bench_against_tree(args) -> int:
    """This tree's tool against another checkout's on the stdlib corpus, runs interleaved
    (A B A B ...) so that the shared machine's load falls on both alike."""
    import statistics

    out, corpus, docs, size, tok_dir = prepare_inputs(args)
    base = Path(args.baseline_tree).resolve()
    common = ["--input", str(corpus), "--json-keys", "text", "--append-eod", "--workers", str(args.workers),
              "--tokenizer-model", str(tok_dir), "--no-progress"]
    runs = {
        "baseline tree": ([sys.executable, str(base / "tools" / "preprocess_data.py"), *common,
                           "--output-prefix", str(out / "base")], base),
        "this tree, default": ([sys.executable, str(REPO / "tools" / "preprocess_data.py"), *common,
                                "--output-prefix", str(out / "new")], REPO),
        "this tree, --parse-special-tokens": ([sys.executable, str(REPO / "tools" / "preprocess_data.py"), *common,
                                               "--output-prefix", str(out / "newparse"), "--parse-special-tokens"],
                                              REPO),
    }
    print(f"corpus: {docs} files, {size / 1e6:.2f} MB of JSON lines; workers {args.workers}; "
          f"baseline {base}; load average {os.getloadavg()[0]:.1f}")
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeat):
        for name, (cmd, tree) in runs.items():
            times[name].append(timed(cmd, dict(os.environ, PYTHONPATH=str(tree), TOKENIZERS_PARALLELISM="true")))
    print(f"{'run':<36} {'best s':>7} {'median s':>9} {'MB/s (best)':>12}")
    for name, ts in times.items():
        print(f"{name:<36} {min(ts):7.2f} {statistics.median(ts):9.2f} {size / 1e6 / min(ts):12.2f}")
    b = min(times["baseline tree"])
    print(f"ratio baseline/this (best): default {b / min(times['this tree, default']):.3f}, "
          f"--parse-special-tokens {b / min(times['this tree, --parse-special-tokens']):.3f}; "
          f"load average after {os.getloadavg()[0]:.1f}")
    same = all((out / f"base_text_document{e}").read_bytes() == (out / f"newparse_text_document{e}").read_bytes()
               for e in (".bin", ".idx"))
    same_default = all((out / f"base_text_document{e}").read_bytes() == (out / f"new_text_document{e}").read_bytes()
                       for e in (".bin", ".idx"))
    print(f"--parse-special-tokens output byte-identical to the baseline tree's: {'yes' if same else 'NO'}; "
          f"default output byte-identical to the baseline tree's (a baseline that already keeps special-token "
          f"text as text): {'yes' if same_default else 'NO'}")
    import numpy as np

    from megatron_sc2.data.indexed import IndexedDataset

    a, n = IndexedDataset(out / "base_text_document"), IndexedDataset(out / "new_text_document")
    differ = sum(not np.array_equal(a.document(i), n.document(i)) for i in range(a.num_documents))
    print(f"default output: {differ} of {a.num_documents} documents differ from the baseline "
          f"(documents quoting special-token text)")
    return 0 if same or same_default else 1


def bench_portrait(args) -> int:
    """preprocess --portrait DIR against preprocess then `portrait build`, runs interleaved."""
    import statistics

    out, corpus, docs, size, tok_dir = prepare_inputs(args)
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="true")
    pre = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(corpus), "--json-keys", "text",
           "--append-eod", "--workers", str(args.workers), "--tokenizer-model", str(tok_dir), "--no-progress"]
    build = [sys.executable, "-m", "megatron_sc2.cli", "portrait", "build", "--data-path",
             str(out / "withp_text_document"), "--tokenizer-model", str(tok_dir), "--output", str(out / "built")]
    runs = {"preprocess": [*pre, "--output-prefix", str(out / "plain")],
            "preprocess --portrait": [*pre, "--output-prefix", str(out / "withp"), "--portrait", str(out / "during")],
            "portrait build (of its output)": build}
    print(f"corpus: {docs} files, {size / 1e6:.2f} MB of JSON lines; workers {args.workers}; "
          f"load average {os.getloadavg()[0]:.1f}")
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeat):
        for name, cmd in runs.items():
            times[name].append(timed(cmd, env))
    print(f"{'run':<32} {'best s':>7} {'median s':>9}")
    for name, ts in times.items():
        print(f"{name:<32} {min(ts):7.2f} {statistics.median(ts):9.2f}")
    a, c, b = (min(times[k]) for k in runs)
    print(f"best times: preprocess {a:.2f} s; with --portrait {c:.2f} s (+{c - a:.2f} s, {c / a:.2f}x); "
          f"preprocess + portrait build {a + b:.2f} s; ratio (preprocess + build) / (--portrait): "
          f"{(a + b) / c:.2f}x; load average after {os.getloadavg()[0]:.1f}")
    from megatron_sc2.governance.portrait import filter_path

    same_filter = filter_path(out / "during").read_bytes() == filter_path(out / "built").read_bytes()
    same_data = all((out / f"plain_text_document{e}").read_bytes() == (out / f"withp_text_document{e}").read_bytes()
                    for e in (".bin", ".idx"))
    print(f"portrait byte-identical to portrait build's: {'yes' if same_filter else 'NO'}; "
          f"dataset unchanged by the flag: {'yes' if same_data else 'NO'}")
    return 0 if same_filter and same_data else 1


if __name__ == "__main__":
    sys.exit(main())
