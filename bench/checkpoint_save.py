"""Benchmark: how long a checkpoint save stops training, --async-save against the plain save.

One process trains a small StarCoder2 on mock data and saves every `--save-interval` steps, once
with the blocking save and once with `--async-save`; both runs are timed in this one script.
Printed per mode: the median step time without a save, the median time a periodic save holds
up training (the stall), and the wall time of the whole run (steps, periodic saves, and the
final save, which both modes wait for); then both ratios plain / async (>1: async is better).
The async run's background writes overlap the next steps (and compete with them for the CPU).

    python bench/checkpoint_save.py                      # ~110M parameters with Adam state
    python bench/checkpoint_save.py --hidden-size 512 --num-layers 4
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megatron_sc2.config import parse_train_args  # noqa: E402
from megatron_sc2.training.trainer import Trainer  # noqa: E402


def run(mode: str, args, root: Path) -> tuple[float, float, float, int]:
    save = root / mode
    flags = ["--model", "starcoder2-demo", "--mock-data", "--num-layers", str(args.num_layers),
             "--hidden-size", str(args.hidden_size), "--ffn-hidden-size", str(4 * args.hidden_size),
             "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "2",
             "--train-iters", str(args.steps), "--save-interval", str(args.save_interval),
             "--save", str(save), "--log-interval", str(10 ** 6), "--lr", "1e-4"]
    if mode == "async":
        flags.append("--async-save")
    trainer = Trainer(parse_train_args(flags))
    params = sum(p.numel() for p in trainer.model.parameters())
    t0 = time.perf_counter()
    records = trainer.train()
    wall = time.perf_counter() - t0
    plain = [r["step_time_s"] for r in records if r["step"] % args.save_interval]
    return statistics.median(plain), statistics.median(trainer.save_stalls), wall, params



def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-interval", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="sc2-bench-save-"))
    try:
        results = {}
        for mode in ("plain", "async"):
            step, stall, wall, params = run(mode, args, root)
            size = sum(f.stat().st_size for f in (root / mode).rglob("*") if f.is_file())
            results[mode] = (stall, wall)
            print(f"{mode:5s}: {params / 1e6:.0f}M parameters, checkpoints on disk {size / 1e9:.2f} GB; "
                  f"step {step:.3f}s; training stopped {stall:.3f}s per periodic save; "
                  f"{args.steps} steps with saves {wall:.2f}s", flush=True)
        (ps, pw), (as_, aw) = results["plain"], results["async"]
        print(f"stall per save plain/async = {ps / as_:.1f}x; whole run plain/async = {pw / aw:.2f}x",
              flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
