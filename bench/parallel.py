"""Throughput of TP2 and PP2 against one process, and bytes communicated per step against
Megatron's analytical volume.

    python bench/parallel.py [--steps 6] [--model starcoder2-demo] [--seq 256] [--gbs 8]

Runs a one-process baseline in this process, then each layout under torchrun (gloo, CPU, one
thread per rank; on a GPU machine the same code runs NCCL). Communication is measured with the
PyTorch profiler: every gloo collective / p2p call is recorded with its message shape
(`gloo:*` events with record_shapes), summed per step and rank. The analytical volume is Megatron's
payload per step for the layout (TP: 2 all-reduces of b x s x h per layer forward, 2
backward, plus the embedding's; PP: one activation forward and one gradient backward per
micro-batch per stage boundary; DP: the gradient volume), with fp32 elements.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_sc2.config import preset  # noqa: E402


def analytic_bytes(layout: dict, cfg, seq: int, gbs: int, mbs: int) -> dict[str, float]:
    """Megatron's communication per step for the busiest rank (fp32), in the convention the
    measurement uses: the size of the tensor each call hands to the backend (an all-reduce or
    reduce-scatter its full buffer, an all-gather its local shard, a send/recv its message)."""
    tp, pp, dp = layout["tp"], layout["pp"], layout["dp"]
    h, L = cfg.hidden_size, cfg.num_layers
    n_mb = gbs // (mbs * dp)
    act = mbs * seq * h * 4
    out: dict[str, float] = {}
    if tp > 1:
        # Per layer 2 all-reduces forward (attention and MLP outputs) and 2 backward (their
        # inputs), plus the vocab-parallel embedding's forward all-reduce (first stage) and the
        # column-parallel output layer's input-gradient all-reduce (last stage).
        out["tp"] = n_mb * (4 * (L / pp) * act + (2 if pp == 1 else 1) * act)
    if pp > 1:
        out["pp"] = n_mb * 2 * act  # activations sent forward, gradients received back
        if cfg.tie_word_embeddings:
            out["pp_tied_embedding"] = cfg.vocab_size * h * 4 / tp  # Megatron's embedding group
    if dp > 1:
        # Distributed optimizer: reduce-scatter the gradients, all-gather the parameters.
        grads = cfg.num_params() * 4 / (tp * pp)
        out["dp"] = grads + grads / dp
    return out


def run_layout(layout: dict, args) -> dict:
    nproc = layout["tp"] * layout["pp"] * layout["dp"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, "--worker",
               "--layout", json.dumps(layout), "--out", out.name, "--model", args.model,
               "--seq", str(args.seq), "--gbs", str(args.gbs), "--mbs", str(args.mbs),
               "--steps", str(args.steps)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"layout {layout} failed:\n{proc.stderr[-4000:]}")
        return json.loads(Path(out.name).read_text())


def _comm_bytes(trace_file: str) -> dict[str, float]:
    """Bytes of the messages of gloo collectives / p2p calls in a chrome trace (the first
    input of each `gloo:*` event, which the profiler records with record_shapes), by name."""
    events = json.loads(Path(trace_file).read_text()).get("traceEvents", [])
    sizes = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4,
             "double": 8, "unsigned char": 1, "bool": 1}
    total: dict[str, float] = {}
    for e in events:
        name = str(e.get("name", ""))
        if not name.startswith("gloo:") or name in ("gloo:barrier",):
            continue
        a = e.get("args", {})
        dims = (a.get("Input Dims") or [[]])[0]
        kind = (a.get("Input type") or ["float"])[0]
        shapes = dims if dims and isinstance(dims[0], list) else [dims]
        n = sum(math.prod(d) for d in shapes if d is not None)
        total[name] = total.get(name, 0.0) + n * sizes.get(kind, 4)
    return total


def worker(args) -> None:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from megatron_sc2.parallel.engine import Engine, build_mesh
    from megatron_sc2.parallel.layout import ParallelLayout

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    lay = json.loads(args.layout)
    cfg = preset(args.model)
    layout = ParallelLayout(tp=lay["tp"], pp=lay["pp"], dp=lay["dp"], micro_batch_size=args.mbs,
                            global_batch_size=args.gbs).validate(cfg, args.seq)
    torch.manual_seed(0)
    pm = Engine.build(cfg, layout, build_mesh(layout))
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-4, foreach=False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (layout.local_batch_size, args.seq + 1), generator=g)

    def step():
        opt.zero_grad()
        pm.forward_backward(tokens[:, :-1], tokens[:, 1:])
        pm.clip_grad_norm_(1.0)
        opt.step()

    step()  # warm-up (pipeline shape inference, allocations)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    dt = (time.perf_counter() - t0) / args.steps
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    trace = f"{args.out}.rank{dist.get_rank()}.trace.json"
    prof.export_chrome_trace(trace)
    comm = _comm_bytes(trace)
    os.remove(trace)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, comm)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"step_s": dt, "comm_per_rank": per_rank}))
    del pm, opt
    import gc

    gc.collect()
    dist.destroy_process_group()


def baseline(args) -> float:
    import torch.nn.functional as F

    from megatron_sc2.model.starcoder2 import StarCoder2

    torch.set_num_threads(1)
    cfg = preset(args.model)
    torch.manual_seed(0)
    model = StarCoder2(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.gbs, args.seq + 1), generator=g)

    def step():
        opt.zero_grad()
        for t in tokens.split(args.mbs):
            logits = model(t[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), t[:, 1:].reshape(-1))
            (loss * t.shape[0] / args.gbs).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    return (time.perf_counter() - t0) / args.steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--layout")
    ap.add_argument("--out")
    ap.add_argument("--model", default="starcoder2-demo")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layouts", default="tp2,pp2,dp2")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    cfg = preset(args.model)
    tokens = args.gbs * args.seq
    base = baseline(args)
    print(f"model {args.model}, seq {args.seq}, global batch {args.gbs}, micro batch {args.mbs}, "
          f"{args.steps} timed steps, gloo on CPU, 1 thread per rank")
    print(f"| layout | ranks | step s | tokens/s | vs 1 process | measured MB/step/rank | "
          f"analytical MB/step/rank | measured / analytical |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 1 process | 1 | {base:.3f} | {tokens / base:.0f} | 1.00 | 0 | 0 | - |")
    for spec in args.layouts.split(","):
        layout = {"tp": 1, "pp": 1, "dp": 1}
        for part in spec.split("x"):
            layout[part[:2]] = int(part[2:])
        res = run_layout(layout, args)
        meas = max(sum(c.values()) for c in res["comm_per_rank"]) / 1e6
        ana = sum(analytic_bytes(layout, cfg, args.seq, args.gbs, args.mbs).values()) / 1e6
        kinds = {}
        for c in res["comm_per_rank"]:
            for k, v in c.items():
                kinds[k] = max(kinds.get(k, 0.0), v / 1e6)
        print(f"| {spec} | {layout['tp'] * layout['pp'] * layout['dp']} | {res['step_s']:.3f} | "
              f"{tokens / res['step_s']:.0f} | {base / res['step_s']:.2f} | {meas:.2f} | {ana:.2f} | "
              f"{meas / ana if ana else float('nan'):.2f} |   <!-- by call: "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(kinds.items())) + " -->")


if __name__ == "__main__":
    main()
