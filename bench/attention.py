"""Benchmark: our sliding-window GQA attention (forward + backward) against the alternatives.

On the CPU: our C++ kernel vs PyTorch SDPA given the equivalent boolean mask, and vs SDPA plain
causal (which does less masking work but more attention work than a window needs).
On a GPU (when one exists): our CUDA kernels (the default family as `ours`, the other as
`ours_<family>`: tensor-core `mma` and `simt`) vs the same two, and vs FlexAttention
(`torch.nn.attention.flex_attention`, compiled) with a sliding-window block mask; with achieved
TFLOP/s (useful work only: 4*d flops per visible (query, key) pair forward, 2.5x that backward).

    python bench/attention.py                        # CPU, 3B-like: 24 heads / 2 kv heads, d=64
    python bench/attention.py --device cuda          # GPU, d=128
    python bench/attention.py --seqs 8192 --windows 1024 --repeats 3

Each line prints the time of each method and the ratios (their time / ours); >1 means we win.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megatron_sc2.ops.attention import (attention_backend, sliding_window_attention,  # noqa: E402
                                        window_mask)


@dataclass
class Row:
    device: str
    seq: int
    window: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int
    dtype: str
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    ratio_vs_ours: dict[str, float] = field(default_factory=dict)
    gflops: dict[str, float] = field(default_factory=dict)


def visible_pairs(seq: int, window: int) -> int:
    """Number of (query, key) pairs a sliding window of `window` keeps (diagonal included)."""
    full = min(seq, window)
    return full * (full + 1) // 2 + max(0, seq - window) * window


def timed(fn: Callable[[], None], repeats: int, warmup: int, device: str) -> tuple[float, float]:
    """Median wall time and median process CPU time of fn (after `warmup` untimed runs),
    synchronizing on the GPU. CPU time is steadier than wall time on a shared machine."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def make_inputs(args, seq: int, window: int, d: int, device: str,
                dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k, v and the output gradient of one configuration, seeded by (seq, window)."""
    gen = torch.Generator().manual_seed(seq + window)
    return tuple(torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
                 for shape in ((args.batch, seq, args.heads, d), (args.batch, seq, args.kv_heads, d),
                               (args.batch, seq, args.kv_heads, d), (args.batch, seq, args.heads, d)))


def make_methods(q, k, v, go, window: int, device: str, with_flex: bool,
                 with_mask: bool) -> dict[str, Callable[[], None]]:
    h, kvh = q.shape[2], k.shape[2]

    def fresh():
        return [t.detach().requires_grad_() for t in (q, k, v)]

    def ours():
        a = fresh()
        sliding_window_attention(*a, window=window).backward(go)

    methods = {"ours": ours}
    if device == "cuda":  # both CUDA kernel families, whichever is the default
        from megatron_sc2.ops import kernels

        default = kernels.DEFAULT_CUDA_KERNEL
        for family in kernels.CUDA_KERNELS:
            if family == default:
                continue

            def ours_family(family=family):
                saved = os.environ.get("MEGATRON_SC2_CUDA_KERNEL")
                os.environ["MEGATRON_SC2_CUDA_KERNEL"] = family
                try:
                    ours()
                finally:
                    if saved is None:
                        os.environ.pop("MEGATRON_SC2_CUDA_KERNEL")
                    else:
                        os.environ["MEGATRON_SC2_CUDA_KERNEL"] = saved

            methods[f"ours_{family}"] = ours_family
    if with_mask:
        mask = window_mask(q.shape[1], window, q.device)

        def sdpa_mask():
            a = [t.transpose(1, 2) for t in fresh()]
            F.scaled_dot_product_attention(*a, attn_mask=mask, enable_gqa=h != kvh).backward(
                go.transpose(1, 2))

        methods["sdpa_mask"] = sdpa_mask

    def sdpa_causal():
        a = [t.transpose(1, 2) for t in fresh()]
        F.scaled_dot_product_attention(*a, is_causal=True, enable_gqa=h != kvh).backward(
            go.transpose(1, 2))

    methods["sdpa_causal"] = sdpa_causal
    if with_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def sliding(b, hh, qi, kj):
            return (kj <= qi) & (qi - kj < window)

        block_mask = create_block_mask(sliding, B=None, H=None, Q_LEN=q.shape[1],
                                       KV_LEN=q.shape[1], device=device)
        flex = torch.compile(flex_attention, dynamic=False)

        def flex_run():
            a = [t.transpose(1, 2) for t in fresh()]
            flex(*a, block_mask=block_mask, enable_gqa=h != kvh).backward(go.transpose(1, 2))

        methods["flex"] = flex_run
    return methods


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--seqs", default="4096,8192,16384")
    p.add_argument("--windows", default="1024,4096")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=None, help="default: 64 on CPU, 128 on GPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-mask-seq", type=int, default=1 << 30,
                   help="skip SDPA-with-mask above this length (it costs O(seq^2) time and memory)")
    p.add_argument("--threads", type=int, default=None, help="torch (and our kernel's) CPU threads")
    p.add_argument("--phases", action="store_true",
                   help="only our kernel: forward and backward timed apart, with useful GFLOP/s")
    p.add_argument("--isa", choices=["avx2", "baseline"], default=None,
                   help="force this instruction-set build of our C++ kernel")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = args.head_dim or (64 if device == "cpu" else 128)
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    probe = torch.empty(1, 1, 1, d, dtype=dtype, device=device)
    print(f"# device={device} threads={torch.get_num_threads()} backend={attention_backend(probe)} "
          f"heads={args.heads}/{args.kv_heads} head_dim={d} batch={args.batch} dtype={dtype}",
          flush=True)
    if device == "cpu":
        from megatron_sc2.ops import kernels
        mod = kernels.cpu_module()
        if mod is not None and args.isa:
            mod.set_isa(args.isa)
        print(f"# cpu kernel isa={mod.isa() if mod else 'not built'}", flush=True)
    else:
        print(f"# gpu={torch.cuda.get_device_name()}", flush=True)
    if args.phases:
        return phases(args, device, d, dtype)
    rows = []
    for seq in [int(x) for x in args.seqs.split(",")]:
        for window in [int(x) for x in args.windows.split(",")]:
            q, k, v, go = make_inputs(args, seq, window, d, device, dtype)
            methods = make_methods(q, k, v, go, window, device,
                                   with_flex=device == "cuda" and not args.no_flex,
                                   with_mask=seq <= args.max_mask_seq)
            row = Row(device, seq, window, args.heads, args.kv_heads, d, args.batch,
                      str(dtype).replace("torch.", ""))
            pairs = visible_pairs(seq, window) * args.batch * args.heads
            useful = pairs * 4 * d * 3.5  # forward + backward (2.5x forward)
            for name, fn in methods.items():
                try:
                    row.seconds[name], row.cpu_seconds[name] = timed(fn, args.repeats,
                                                                     args.warmup, device)
                except Exception as exc:  # e.g. out of memory: report, keep going
                    print(f"#   {name} failed at seq {seq} window {window}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
                    continue
                row.gflops[name] = useful / row.seconds[name] / 1e9
                if device == "cuda":
                    torch.cuda.empty_cache()
            ours = row.seconds.get("ours")
            if ours:
                row.ratio_vs_ours = {n: t / ours for n, t in row.seconds.items() if n != "ours"}
            times = " ".join(f"{n}={t:.3f}s" for n, t in row.seconds.items())
            if device == "cpu":
                times += " (cpu time " + " ".join(
                    f"{n}={t:.2f}s" for n, t in row.cpu_seconds.items()) + ")"
            ratios = " ".join(f"{n}/ours={r:.2f}x" for n, r in row.ratio_vs_ours.items())
            tf = " ".join(f"{n}={t:.1f}" for n, t in row.gflops.items())
            print(f"seq={seq:6d} window={window:5d}  fwd+bwd {times}  | {ratios}  | GFLOP/s {tf}",
                  flush=True)
            rows.append(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in rows], indent=1))
        tmp.replace(args.json)
    return 0


def phases(args, device: str, d: int, dtype: torch.dtype) -> int:
    """Our kernel alone: forward and backward apart, useful GFLOP/s by wall and by CPU time."""
    for seq in [int(x) for x in args.seqs.split(",")]:
        for window in [int(x) for x in args.windows.split(",")]:
            q, k, v, go = make_inputs(args, seq, window, d, device, dtype)
            fwd_flops = visible_pairs(seq, window) * args.batch * args.heads * 4 * d
            holder = {}

            def forward():
                with torch.no_grad():
                    sliding_window_attention(q, k, v, window=window)

            def backward():
                xs = [t.detach().requires_grad_() for t in (q, k, v)]
                holder["out"] = sliding_window_attention(*xs, window=window)
                t0, c0 = time.perf_counter(), time.process_time()
                holder["out"].backward(go)
                if device == "cuda":
                    torch.cuda.synchronize()
                holder["t"] = (time.perf_counter() - t0, time.process_time() - c0)

            fw, fc = timed(forward, args.repeats, args.warmup, device)
            backs = []
            for _ in range(max(1, args.repeats)):
                backward()
                backs.append(holder["t"])
            bw = statistics.median(t[0] for t in backs)
            bc = statistics.median(t[1] for t in backs)
            print(f"seq={seq:6d} window={window:5d} ours forward {fw:.3f}s (cpu {fc:.3f}s) "
                  f"{fwd_flops / fw / 1e9:.1f} GFLOP/s wall, {fwd_flops / fc / 1e9:.1f} per cpu-s | "
                  f"backward {bw:.3f}s (cpu {bc:.3f}s) {2.5 * fwd_flops / bw / 1e9:.1f} GFLOP/s "
                  f"wall, {2.5 * fwd_flops / bc / 1e9:.1f} per cpu-s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
