"""Bytes moved per step by context parallelism's halo exchange, measured with the PyTorch
profiler, against the analytical halo volume and against the all-gather volume Transformer
Engine moves for sliding-window CP (it refuses ring p2p for windows and all-gathers K/V).

    python bench/cp_halo.py [--model starcoder2-demo] [--seq 256] [--gbs 4]

One torchrun world of 4 ranks (gloo, CPU, one thread each) loops over the layouts CP4, CP2 x TP2
and CP2 x DP2 and the windows given (--windows, 0 = none), profiling one training step each.
Measured = every `gloo:send` message of the step (the halo exchange is the only point-to-point
traffic without a pipeline), floating-point K/V messages and int64 document-id messages
apart, summed over all ranks. The last table is analytical only: the real 16k shapes.

    python bench/cp_halo.py --rank-attention [--seq 16384] [--windows 4096] [--cp 4] [--rank 3]
        [--heads 8] [--kv-heads 2] [--head-dim 32] [--dtype fp32|bf16] [--repeats 5]
        [--device cpu|cuda]

instead times one CP rank's attention call (the kernels' operators, forward and backward apart;
on the CPU with this process's threads, with --device cuda on the GPU, synchronized): its
L = seq / cp queries against the h + L keys [halo, chunk] as context_parallel.py calls it now
(a query offset), against what it did before (the queries prefixed with h zero rows, their
outputs dropped), side by side, alternating, median of repeats.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_sc2.config import preset  # noqa: E402
from megatron_sc2.parallel.context_parallel import (allgather_volume_bytes,  # noqa: E402
                                                    halo_volume_bytes)

LAYOUTS = {"cp4": dict(tp=1, dp=1, cp=4), "cp2xtp2": dict(tp=2, dp=1, cp=2),
           "cp2xdp2": dict(tp=1, dp=2, cp=2)}
SIZES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4}


def _send_bytes(trace_file: str) -> dict[str, int]:
    """Bytes of the `gloo:send` messages in a chrome trace, by element type."""
    events = json.loads(Path(trace_file).read_text()).get("traceEvents", [])
    out: dict[str, int] = {}
    for e in events:
        if str(e.get("name", "")) != "gloo:send":
            continue
        a = e.get("args", {})
        dims = (a.get("Input Dims") or [[]])[0]
        kind = (a.get("Input type") or ["float"])[0]
        n = 1
        for d in dims:
            n *= d
        out[kind] = out.get(kind, 0) + n * SIZES.get(kind, 4)
    return out


def analytic(cfg, seq: int, cp: int, window, batch: int, kv_local: int, layers: int,
             elem: int, copies: int) -> tuple[int, int]:
    """(halo, all-gather) K/V bytes per step over the world: `copies` CP groups (dp x tp)."""
    halo = halo_volume_bytes(seq, cp, window, batch, kv_local, cfg.head_dim, layers, elem)
    ag = allgather_volume_bytes(seq, cp, batch, kv_local, cfg.head_dim, layers, elem)
    return halo * copies, ag * copies


def worker(args) -> None:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from megatron_sc2.data.batch import get_batch
    from megatron_sc2.parallel.engine import Engine, build_mesh
    from megatron_sc2.parallel.layout import ParallelLayout

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rows = []
    for window in [int(w) for w in args.windows.split(",")]:
        cfg = preset(args.model)
        cfg.sliding_window = window or None
        for name, lay in LAYOUTS.items():
            layout = ParallelLayout(tp=lay["tp"], dp=lay["dp"], cp=lay["cp"], micro_batch_size=1,
                                    global_batch_size=args.gbs).validate(cfg, args.seq)
            torch.manual_seed(0)
            pm = Engine.build(cfg, layout, build_mesh(layout))
            g = torch.Generator().manual_seed(0)
            t = torch.randint(1, cfg.vocab_size, (layout.local_batch_size, args.seq + 1), generator=g)
            t[torch.rand(t.shape, generator=g) < 0.01] = 0
            b = get_batch(t, 0, reset_position_ids=True, reset_attention_mask=True)

            def step():
                pm.forward_backward(b["tokens"], b["labels"], position_ids=b["position_ids"],
                                    document_ids=b["document_ids"])
            step()  # warm-up
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                step()
            trace = f"{args.out}.rank{dist.get_rank()}.trace.json"
            prof.export_chrome_trace(trace)
            sent = _send_bytes(trace)
            os.remove(trace)
            mine = torch.tensor([sum(v for k, v in sent.items() if k != "long int"),
                                 sent.get("long int", 0)], dtype=torch.int64)
            peak = mine.clone()
            dist.all_reduce(mine)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            kv_local = max(cfg.num_query_groups // layout.tp, 1)
            halo, ag = analytic(cfg, args.seq, layout.cp, cfg.sliding_window,
                                layout.local_batch_size, kv_local, cfg.num_layers, 4,
                                layout.dp * layout.tp)
            rows.append(dict(layout=name, window=window, kv_bytes=int(mine[0]),
                             ids_bytes=int(mine[1]), busiest_rank_kv=int(peak[0]),
                             halo_analytic=halo, allgather_analytic=ag))
            del pm
            gc.collect()
            dist.barrier()
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def rank_attention(args) -> None:
    """Padded (before) vs offset (now) attention of one CP rank: the medians and their ratio."""
    import math
    import statistics
    import time

    from megatron_sc2.ops import attention_ops, kernels
    from megatron_sc2.parallel.context_parallel import halo_length

    seq, window = args.seq or 16384, int((args.windows or "4096").split(",")[0]) or None
    chunk = seq // args.cp
    h = halo_length(args.rank, chunk, window)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    d = args.head_dim
    q = torch.randn(1, chunk, args.heads, d, generator=g).to(dev, dtype)
    k, v = (torch.randn(1, h + chunk, args.kv_heads, d, generator=g).to(dev, dtype)
            for _ in range(2))
    go = torch.randn(1, chunk, args.heads, d, generator=g).to(dev, dtype)
    pad = lambda t: torch.cat([t.new_zeros((1, h) + t.shape[2:]), t], dim=1)  # noqa: E731
    win = 0 if window is None or window >= h + chunk else window
    scale = 1.0 / math.sqrt(d)
    calls = {"padded (before)": (pad(q), pad(go)), "offset (now)": (q, go)}
    times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "bwd": []} for n in calls}
    for rep_ in range(args.repeats + 1):  # the first round warms up
        for name, (qq, gg) in calls.items():
            sync()
            t0 = time.perf_counter()
            o, lse = attention_ops.swa_forward(qq, k, v, None, win, scale)
            sync()
            t1 = time.perf_counter()
            attention_ops.swa_backward(qq, k, v, o, lse, None, gg, win, scale)
            sync()
            t2 = time.perf_counter()
            if rep_:
                times[name]["fwd"].append(t1 - t0)
                times[name]["bwd"].append(t2 - t1)
    print(f"one CP rank's attention: sequence {seq}, window {window}, CP{args.cp}, rank "
          f"{args.rank} ({chunk} queries, halo {h}), {args.heads}/{args.kv_heads} heads, head dim "
          f"{d}, batch 1, {args.dtype}, " + (
              f"C++ kernel {kernels.cpu_module().isa()}, {torch.get_num_threads()} threads"
              if dev.type == "cpu" else f"{torch.cuda.get_device_name()}, "
              f"{'simt' if kernels.cuda_kernel_code() == 1 else 'mma'} kernels")
          + f", median of {args.repeats}")
    print("| call | forward ms | backward ms | forward + backward ms |")
    print("|---|---|---|---|")
    med = {n: {p: statistics.median(x) * 1e3 for p, x in t.items()} for n, t in times.items()}
    for name, m in med.items():
        print(f"| {name} | {m['fwd']:.1f} | {m['bwd']:.1f} | {m['fwd'] + m['bwd']:.1f} |")
    a, b = med["padded (before)"], med["offset (now)"]
    print(f"| padded / offset | {a['fwd'] / b['fwd']:.2f}x | {a['bwd'] / b['bwd']:.2f}x | "
          f"{(a['fwd'] + a['bwd']) / (b['fwd'] + b['bwd']):.2f}x |")


def real_shapes() -> list[dict]:
    """Analytical K/V bytes per sample per step at 16k, CP 4, bf16, for each preset."""
    out = []
    for name in ("starcoder2-3b", "starcoder2-7b", "starcoder2-15b"):
        cfg = preset(name)
        for tp in (1, 4):
            kv = max(cfg.num_query_groups // tp, 1)
            halo = halo_volume_bytes(16384, 4, cfg.sliding_window, 1, kv, cfg.head_dim,
                                     cfg.num_layers, 2)
            ag = allgather_volume_bytes(16384, 4, 1, kv, cfg.head_dim, cfg.num_layers, 2)
            out.append(dict(model=name, tp=tp, halo=halo * tp, allgather=ag * tp))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="starcoder2-demo")
    ap.add_argument("--seq", type=int, help="default 256 (16384 with --rank-attention)")
    ap.add_argument("--gbs", type=int, default=4)
    ap.add_argument("--windows", help="default 32,128,0 (4096 with --rank-attention)")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--rank-attention", action="store_true",
                    help="time one CP rank's attention call, padded queries vs the query offset")
    ap.add_argument("--cp", type=int, default=4)
    ap.add_argument("--rank", type=int, default=3)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()
    if args.rank_attention:
        rank_attention(args)
        return
    args.seq = args.seq or 256
    args.windows = args.windows or "32,128,0"
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
               "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, "--worker",
               "--out", out, "--model", args.model, "--seq", str(args.seq), "--gbs",
               str(args.gbs), "--windows", args.windows]
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        rows = json.loads(Path(out).read_text())
    mb = 1e6
    print(f"{args.model}, sequence {args.seq}, global batch {args.gbs}, fp32; bytes per step "
          "summed over the 4 ranks (forward K/V + backward dK/dV)")
    print("| layout | window | measured K/V MB | analytical halo MB | measured / analytical | "
          "TE all-gather MB | all-gather / halo | doc-id MB | busiest rank K/V MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["kv_bytes"] / r["halo_analytic"] if r["halo_analytic"] else float("nan")
        print(f"| {r['layout']} | {r['window'] or 'none'} | {r['kv_bytes'] / mb:.3f} | "
              f"{r['halo_analytic'] / mb:.3f} | {ratio:.3f} | {r['allgather_analytic'] / mb:.3f} | "
              f"{r['allgather_analytic'] / r['halo_analytic']:.2f} | {r['ids_bytes'] / mb:.4f} | "
              f"{r['busiest_rank_kv'] / mb:.3f} |")
    print("\nAnalytical, sequence 16384, window 4096, CP 4, bf16, one sample, K/V bytes per step "
          "over one CP group x TP")
    print("| model | TP | halo MB | TE all-gather MB | all-gather / halo |")
    print("|---|---|---|---|---|")
    for r in real_shapes():
        print(f"| {r['model']} | {r['tp']} | {r['halo'] / mb:.1f} | {r['allgather'] / mb:.1f} | "
              f"{r['allgather'] / r['halo']:.2f} |")


if __name__ == "__main__":
    main()
