"""`megatron-sc2 plan`: the layouts of a model that fit a cluster's GPUs, best first.

    megatron-sc2 plan --model starcoder2-15b --seq-length 16384 --gpus 64 --gpu h100-80gb
        [--global-batch-size B] [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P]
        [--context-parallel-size C] [--top N] [--all] [--write-config FILE [--pick N]]

Each row: the layout, per-GPU memory (parameters, gradients, optimizer state, activations,
communication buffers, total) of the fullest rank, estimated step time, MFU and tokens/s per GPU
(planning/planner.py says what the estimates rest on). `--write-config` writes the best layout
`train` can run (or row N of the table) as a YAML config for `megatron-sc2 submit --config`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_sc2.config import PRESETS, preset
from megatron_sc2.errors import CommandLineParser, ConfigError
from megatron_sc2.planning import planner
from megatron_sc2.planning.planner import GIB, GPUS, Plan


def _parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="megatron-sc2 plan", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help=f"one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu", default="h100-80gb", help=f"one of {', '.join(GPUS)}")
    p.add_argument("--global-batch-size", type=int,
                   help="sequences per step (default: about 4M tokens)")
    p.add_argument("--tensor-model-parallel-size", type=int)
    p.add_argument("--pipeline-model-parallel-size", type=int)
    p.add_argument("--context-parallel-size", type=int)
    p.add_argument("--rotary-base", type=float, help="written into the config (the 16k stage)")
    p.add_argument("--top", type=int, default=10, help="rows to print (default 10)")
    p.add_argument("--all", action="store_true", help="also list layouts that do not fit")
    p.add_argument("--write-config", metavar="FILE")
    p.add_argument("--pick", type=int, help="row of the table to write (default: the best "
                   "layout train runs today, i.e. without CP)")
    return p


def format_table(plans: list[Plan], gpu: planner.GPU, top: int) -> str:
    head = (f"{'#':>3}  {'layout':<28} {'mbs':>3} {'recompute':<9} {'mb/step':>7}  "
            f"{'params':>6} {'grads':>6} {'optim':>6} {'activ':>6} {'comm':>5} {'total':>6}  "
            f"{'step s':>7} {'MFU':>5} {'tok/s/GPU':>9}  note")
    lines = [head]
    for i, pl in enumerate(plans[:top], 1):
        m, lay = pl.memory, pl.layout
        notes = []
        if not pl.fits:
            notes.append("does not fit")
        lines.append(
            f"{i:>3}  {lay.describe():<28} {lay.micro_batch_size:>3} {lay.recompute or '-':<9} "
            f"{lay.num_microbatches:>7}  {m.params / GIB:>6.1f} {m.grads / GIB:>6.1f} "
            f"{m.optimizer / GIB:>6.1f} {m.activations / GIB:>6.1f} {m.comm_buffers / GIB:>5.1f} "
            f"{m.total / GIB:>6.1f}  {pl.step_time_s:>7.2f} {pl.mfu:>5.1%} "
            f"{pl.tokens_per_s_per_gpu:>9.0f}  {', '.join(notes)}")
    return "\n".join(lines)


def write_config(path: str, data: dict, header: str) -> None:
    """YAML written under a temporary name, then renamed."""
    import yaml

    target = Path(path)
    if target.parent and not target.parent.exists():
        raise ConfigError(f"--write-config {path}: directory {target.parent} does not exist")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(header + yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, target)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    cfg = preset(args.model)
    if args.gpu not in GPUS:
        raise ConfigError(f"--gpu {args.gpu!r} is not known; known: {', '.join(GPUS)}")
    gpu = GPUS[args.gpu]
    if args.top <= 0:
        raise ConfigError(f"--top must be positive, got {args.top}")
    plans = planner.plan(cfg, args.seq_length, args.gpus, gpu, args.global_batch_size,
                         args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                         args.context_parallel_size)
    fitting = [p for p in plans if p.fits]
    shown = plans if args.all else fitting
    gbs = plans[0].layout.global_batch_size
    print(f"{args.model} at {args.seq_length} tokens, {gbs} sequences per step, on {args.gpus} x "
          f"{gpu.name} ({planner.usable_bytes(gpu) / GIB:.1f} GiB usable of "
          f"{gpu.memory_bytes / GIB:.1f}): {len(fitting)} of {len(plans)} layouts fit")
    if not fitting:
        smallest = min(plans, key=lambda p: p.memory.total)
        raise ConfigError(
            f"no layout of {args.model} at --seq-length {args.seq_length} fits {args.gpus} x "
            f"{args.gpu}: the smallest needs {smallest.memory.total / GIB:.1f} GiB per GPU "
            f"({smallest.layout.describe()}); add GPUs or use a larger --gpu")
    print(format_table(shown, gpu, args.top))
    print(f"memory: live tensors of the fullest rank (bf16 autocast, fp32 master weights and AdamW, "
          f"FSDP2 over DP); time: model FLOPs at {planner.MATMUL_EFFICIENCY:.0%} of the bf16 peak "
          f"plus bubble and exposed TP/CP traffic -- an estimate, not a measurement")
    if args.write_config:
        if args.pick is not None:
            if not 1 <= args.pick <= len(shown):
                raise ConfigError(f"--pick {args.pick} is not a row of the table (1..{len(shown)})")
            chosen = shown[args.pick - 1]
        else:
            chosen = fitting[0]
        data = planner.layout_config(args.model, cfg, args.seq_length, chosen.layout,
                                     args.rotary_base)
        m = chosen.memory
        header = (f"# megatron-sc2 plan: {chosen.layout.describe()} on {args.gpus} x {gpu.name}, "
                  f"about {m.total / GIB:.1f} GiB per GPU, {chosen.step_time_s:.2f} s per step "
                  f"(estimated)\n")
        write_config(args.write_config, data, header)
        print(f"wrote {args.write_config}: {chosen.layout.describe()}")
    return 0
