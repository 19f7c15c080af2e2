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
    python bench/attention.py --phases --heads 8 --kv-heads 2 --head-dim 32 \
        --shapes 1:4096:1024,8:256:128 --isas avx512,avx2 --repeats 7   # kernel alone, per call

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
                   help="CPU: forward and backward apart, per call, our kernel (each --isas, and "
                        "--vs-build) against SDPA with the mask, alternating rounds")
    p.add_argument("--shapes", default=None,
                   help="with --phases: BATCH:SEQ:WINDOW,... instead of --batch/--seqs/--windows")
    p.add_argument("--isas", default=None,
                   help="with --phases: comma-separated ISA builds of our kernel to time "
                        "(default: the one in use)")
    p.add_argument("--vs-build", type=Path, action="append", default=[],
                   help="with --phases: also time the _attn_cpu*.so in this directory (another "
                        "build, e.g. /work/main/megatron_sc2/ops) alternately with ours; "
                        "may be repeated")
    p.add_argument("--no-mask", action="store_true", help="with --phases: skip SDPA with the mask")
    p.add_argument("--isa", choices=["avx512", "avx2", "baseline"], default=None,
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


def load_build(directory: Path):
    """The `_attn_cpu` module of another build (e.g. main's megatron_sc2/ops), loaded beside ours
    under its own name, so that one run can time both alternately."""
    import importlib.util

    found = sorted(Path(directory).glob("_attn_cpu*.so"))
    if not found:
        raise SystemExit(f"--vs-build {directory}: no _attn_cpu*.so there")
    # A distinct qualified name per build (not put in sys.modules); the last component stays
    # `_attn_cpu`, whose PyInit function the library exports.
    spec = importlib.util.spec_from_file_location(f"build_{abs(hash(str(directory)))}._attn_cpu",
                                                  found[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def phases(args, device: str, d: int, dtype: torch.dtype) -> int:
    """Forward and backward apart, per call, for each build/ISA of our C++ kernel (called
    directly, as the torch.library operators call it) and for SDPA with the equivalent boolean
    mask (what a user would pick instead). Rounds alternate between the methods, so a shared
    machine's load hits them alike; each time is the best of --repeats rounds."""
    from megatron_sc2.ops import kernels
    from megatron_sc2.ops.kernel_calls import cpu_kernel_backward, cpu_kernel_forward

    if device != "cpu":
        raise SystemExit("--phases times the C++ CPU kernel: use --device cpu")
    mod = kernels.cpu_module()
    if mod is None:
        raise SystemExit(f"C++ kernel not built: {kernels.load_error('_attn_cpu')}")
    isas = args.isas.split(",") if args.isas else [mod.isa()]
    builds = [(f"ours_{isa}", mod, isa) for isa in isas]
    for directory in args.vs_build:
        other = load_build(directory)
        label = "/".join(directory.resolve().parts[-2:])  # e.g. "megatron_sc2/ops"
        builds.append((f"{label}_{other.isa()}", other, other.isa()))
    shapes = ([tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")] if args.shapes
              else [(args.batch, int(s), int(w)) for s in args.seqs.split(",")
                    for w in args.windows.split(",")])
    print(f"# builds: {', '.join(f'{n} ({m.__file__})' for n, m, _ in builds)}; best of "
          f"{args.repeats} alternating rounds; load average before: {os.getloadavg()[0]:.1f}",
          flush=True)
    for batch, seq, window in shapes:
        args.batch = batch
        q, k, v, go = make_inputs(args, seq, window, d, device, dtype)
        scale = 1.0 / d ** 0.5
        win = 0 if window >= seq else window
        fwd_flops = visible_pairs(seq, window) * batch * args.heads * 4 * d
        methods: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
        for name, m, isa in builds:
            def fwd(m=m, isa=isa):
                m.set_isa(isa)
                return cpu_kernel_forward(m, q, k, v, None, win, scale)

            saved = fwd()

            def bwd(m=m, isa=isa, saved=saved):
                m.set_isa(isa)
                cpu_kernel_backward(m, q, k, v, saved[0], saved[1], None, go, win, scale)

            methods[name] = (fwd, bwd)
        if not args.no_mask:
            mask = window_mask(seq, window, q.device)
            qt, kt, vt, got = (t.transpose(1, 2) for t in (q, k, v, go))
            gqa = args.heads != args.kv_heads

            def sdpa_fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)

            holder = {}

            def sdpa_prepare():
                xs = [t.detach().requires_grad_() for t in (qt, kt, vt)]
                holder["out"] = F.scaled_dot_product_attention(*xs, attn_mask=mask, enable_gqa=gqa)

            def sdpa_bwd():
                holder.pop("out").backward(got)

            methods["sdpa_mask"] = (sdpa_fwd, sdpa_bwd)
        best = {n: [float("inf"), float("inf")] for n in methods}
        cpu = {n: [float("inf"), float("inf")] for n in methods}
        for rnd in range(args.warmup + args.repeats):
            for name, (fwd, bwd) in methods.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fwd()
                t1, c1 = time.perf_counter(), time.process_time()
                if name == "sdpa_mask":
                    sdpa_prepare()
                t2, c2 = time.perf_counter(), time.process_time()
                bwd()
                t3, c3 = time.perf_counter(), time.process_time()
                if rnd >= args.warmup:
                    best[name][0] = min(best[name][0], t1 - t0)
                    best[name][1] = min(best[name][1], t3 - t2)
                    cpu[name][0] = min(cpu[name][0], c1 - c0)
                    cpu[name][1] = min(cpu[name][1], c3 - c2)
        head = f"batch={batch} seq={seq} window={window}"
        first = next(iter(best))
        for name, (f, b) in best.items():
            ratio = ""
            if name != first:
                ratio = (f" | vs {first}: fwd {f / best[first][0]:.2f}x bwd {b / best[first][1]:.2f}x "
                         f"fwd+bwd {(f + b) / sum(best[first]):.2f}x")
            print(f"{head} {name:18s} forward {f * 1e3:8.2f} ms  backward {b * 1e3:8.2f} ms  "
                  f"fwd+bwd {(f + b) * 1e3:8.2f} ms  (cpu {cpu[name][0] * 1e3:.1f} + "
                  f"{cpu[name][1] * 1e3:.1f} ms; {fwd_flops / f / 1e9:.0f} / "
                  f"{2.5 * fwd_flops / b / 1e9:.0f} GFLOP/s){ratio}", flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
