"""Benchmark: a linear layer's forward and backward on our GEMM choice (megatron_sc2.ops.linear,
oneDNN on the CPU) against F.linear (PyTorch's default: MKL's sgemm in the CPU wheels), in turns.

    .venv/bin/python bench/gemm.py [--threads 2] [--repeats 7]

Shapes: the linear layers of the `starcoder2-demo` training step (2,048 tokens: q/o 256x256,
k/v 256x64, c_fc 256x1024, c_proj 1024x256, lm_head 256x8192), the 4,096-token step, and the
decode step of bench/generate.py's model (16 rows: c_fc 512x2048, lm_head 512x49152). Each line:
median milliseconds of forward+backward (forward only for the decode rows) per method and
F.linear / ours (>1: ours is faster); the best-time ratio next to it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megatron_sc2.ops.linear import gemm_backend, onednn_linear  # noqa: E402

SHAPES = [  # (name, rows, in, out, bias, backward)
    ("train q/o proj", 2048, 256, 256, True, True),
    ("train k/v proj", 2048, 256, 64, True, True),
    ("train c_fc", 2048, 256, 1024, True, True),
    ("train c_proj", 2048, 1024, 256, True, True),
    ("train lm_head", 2048, 256, 8192, False, True),
    ("train4k c_fc", 4096, 256, 1024, True, True),
    ("train4k lm_head", 4096, 256, 8192, False, True),
    ("decode c_fc", 16, 512, 2048, True, False),
    ("decode lm_head", 16, 512, 49152, False, False),
]


def run(fn, x, w, b, backward: bool, grad) -> None:
    if backward:
        for t in (x, w, b):
            if t is not None:
                t.grad = None
        fn(x, w, b).backward(grad)
    else:
        with torch.no_grad():
            fn(x, w, b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# threads={torch.get_num_threads()} backend={gemm_backend()} torch={torch.__version__}",
          flush=True)
    for name, rows, fin, fout, has_bias, backward in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, fin, generator=g, requires_grad=backward)
        w = (torch.randn(fout, fin, generator=g) * 0.02).requires_grad_(backward)
        b = torch.zeros(fout, requires_grad=backward) if has_bias else None
        grad = torch.randn(rows, fout, generator=g)
        methods = {"F.linear": F.linear, "ours": onednn_linear}
        times: dict[str, list[float]] = {n: [] for n in methods}
        for fn in methods.values():
            run(fn, x, w, b, backward, grad)
        for _ in range(a.repeats):
            for n, fn in methods.items():
                t = time.perf_counter()
                run(fn, x, w, b, backward, grad)
                times[n].append(time.perf_counter() - t)
        med = {n: statistics.median(v) for n, v in times.items()}
        best = {n: min(v) for n, v in times.items()}
        print(f"{name:16s} {rows:5d}x{fin:<5d}->{fout:<6d} {'fwd+bwd' if backward else 'fwd':7s} "
              f"F.linear={med['F.linear'] * 1e3:7.2f}ms ours={med['ours'] * 1e3:7.2f}ms "
              f"ratio {med['F.linear'] / med['ours']:.2f}x (best {best['F.linear'] / best['ours']:.2f}x)",
              flush=True)


if __name__ == "__main__":
    main()
