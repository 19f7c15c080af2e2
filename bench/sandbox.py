"""Benchmark: the sandbox's throughput on the canonical solutions.

    .venv/bin/python bench/sandbox.py [--workers 2] [--tasks humaneval,humaneval-infill-single,...]

Scores every task's canonical completion (HumanEval: 164; infilling: all 1,033 / 5,815 / 1,640)
through the isolated sandbox with `--workers` programs at a time, and prints per task set the
count, pass@1, exact match, seconds and programs/s. Target: HumanEval's 164 in under 30 s on
2 cores. For comparison it also times the same 164 programs run plainly (`python -I` in a
subprocess each, no isolation or limits), the floor any process-per-program harness pays.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_sc2.eval.sandbox import Sandbox  # noqa: E402
from megatron_sc2.eval.scoring import score, summarize  # noqa: E402
from megatron_sc2.eval.tasks import TASK_SETS, build_tasks, load_problems  # noqa: E402


def plain(sources: list[str], workers: int, python: str) -> float:
    def one(src: str) -> int:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "main.py").write_text(src)
            return subprocess.run([python, "-I", "-B", "main.py"], cwd=d, capture_output=True).returncode

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        rcs = list(pool.map(one, sources))
    assert all(rc == 0 for rc in rcs)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", default=",".join(TASK_SETS))
    a = ap.parse_args()
    box = Sandbox(workers=a.workers)
    problems = load_problems()
    print(f"isolated: {box.isolate}, workers {a.workers}, interpreter {box.python}", flush=True)
    for name in a.tasks.split(","):
        tasks = build_tasks(name, problems)
        t0 = time.perf_counter()
        s = summarize(name, score(tasks, [[t.middle] for t in tasks], box), [1])
        dt = time.perf_counter() - t0
        em = f", exact match {s['exact_match']:.3f}" if "exact_match" in s else ""
        print(f"{name:<24} {len(tasks):>5} programs  pass@1 {s['pass@k']['pass@1']:.4f}{em}  "
              f"{dt:7.1f} s  {len(tasks) / dt:5.1f} programs/s", flush=True)
        if name == "humaneval":
            dp = plain([t.program(t.middle) for t in tasks], a.workers, box.python)
            print(f"{'  same, plain subprocess':<24} {len(tasks):>5} programs  {dp:7.1f} s  "
                  f"sandbox/plain time {dt / dp:.2f}", flush=True)


if __name__ == "__main__":
    main()
