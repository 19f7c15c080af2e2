"""Benchmark: HF conversion of a 3B-shaped StarCoder2 (random weights, real shapes).

    .venv/bin/python bench/convert.py [--model starcoder2-3b] [--work DIR] [--dtype bf16]

Writes a random fp32 checkpoint in our DCP format (as the trainer stores it), then runs, each in
its own process so its peak RSS is its own:
  to-hf    ours (fp32) -> HF safetensors (--dtype, default bf16, 5GB shards), verified
  from-hf  that HF directory -> ours (keeps the HF dtype), verified
and prints seconds, peak RSS, the interpreter's own RSS, the largest output shard, and two ratios:
  rss_ratio   (peak RSS - interpreter) / largest output shard   (target < 1.5)
  disk_ratio  conversion seconds / seconds to copy the same input files with fsync (the floor
              set by the disk; 1.0 = disk-bound)

    .venv/bin/python bench/convert.py --verify-logits [--num-layers 24 --hidden-size 1024]

instead measures `--verify-logits` alone on the exported directory, each in its own process:
the streaming verification (convert.verify.verify_logits) against the whole-model one it
replaced (both models fully loaded in fp32: our load_our_model and transformers'
from_pretrained), and prints seconds, peak RSS and the RSS ratio whole / streaming.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_sc2.config import ModelConfig, preset  # noqa: E402
from megatron_sc2.convert.dcp_io import TensorSpec, save_model_streaming  # noqa: E402
from megatron_sc2.convert.layout import expected_shapes  # noqa: E402
from megatron_sc2.training import checkpoint as ckpt  # noqa: E402


def make_source(save: Path, cfg: ModelConfig) -> int:
    """A random-weight fp32 checkpoint, written one tensor at a time."""
    specs = [TensorSpec(n, s, torch.float32) for n, s in expected_shapes(cfg).items()]
    gen = torch.Generator().manual_seed(0)
    tmp = ckpt.temporary_dir(save, 1, str(os.getpid()))
    tmp.mkdir(parents=True)

    def fetch(name: str) -> torch.Tensor:
        shape = next(s.shape for s in specs if s.name == name)
        return torch.empty(shape).normal_(0.0, cfg.init_method_std, generator=gen)

    save_model_streaming(tmp, specs, fetch)
    ckpt.write_meta(tmp, {"iteration": 1, "consumed_samples": 0, "model_config": cfg.to_dict(),
                          "train_config": None, "tokenizer": None, "has_optimizer": False})
    ckpt.finalize(tmp, save, 1)
    return sum(s.nbytes for s in specs)


# Runs a command's main in this interpreter and records the process's own peak RSS (VmHWM,
# which exec resets; ru_maxrss of a child can report the parent's size at fork instead).
_WRAPPER = """
import atexit, runpy, sys
out = sys.argv[1]
def dump():
    with open('/proc/self/status') as f:
        kb = next(l for l in f if l.startswith('VmHWM')).split()[1]
    open(out, 'w').write(kb)
atexit.register(dump)
sys.argv = sys.argv[2:]
if sys.argv[0] == '-c':
    exec(sys.argv[1])
else:
    from megatron_sc2.cli import main
    sys.exit(main(sys.argv))
"""


def measured(cmd: list[str], work: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of `python -m megatron_sc2.cli ARGS` or `python -c CODE`."""
    hwm = work / "vmhwm.txt"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(hwm), *cmd],
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, int(hwm.read_text()) * 1024 / 1e9


def copy_seconds(src: Path, dst: Path) -> float:
    """Copy every file of src with fsync: the disk floor for reading and writing those bytes."""
    t0 = time.perf_counter()
    dst.mkdir(parents=True)
    for f in sorted(src.rglob("*")):
        if f.is_file():
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out)
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    secs = time.perf_counter() - t0
    shutil.rmtree(dst)
    return secs


# Run in a fresh process each (the wrapper's `-c` mode); WORK/ckpt and WORK/hf exist.
_VERIFY_COMMON = """
import torch
from pathlib import Path
from megatron_sc2.config import ModelConfig
from megatron_sc2.training.checkpoint import find_checkpoint, read_meta
work = Path({work!r})
ckpt = find_checkpoint(work / 'ckpt')
cfg = ModelConfig(**read_meta(ckpt)['model_config'])
round_to = {round_to}
"""
_VERIFY_STREAMING = """
from megatron_sc2.convert.verify import verify_logits
diff = verify_logits(ckpt, work / 'hf', cfg, round_to)
print(f'streaming verify: max logit diff {{diff:.3g}}')
"""
# What --verify-logits did before streaming: both whole models in fp32, then the same compare.
_VERIFY_WHOLE = """
from transformers import AutoModelForCausalLM
from megatron_sc2.convert.verify import load_our_model, max_logit_diff
ours = load_our_model(ckpt, cfg, round_to)
hf = AutoModelForCausalLM.from_pretrained(str(work / 'hf'), dtype=torch.float32).eval()
if round_to is not None:
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(round_to))
print(f'whole-model verify: max logit diff {{max_logit_diff(ours, hf, cfg):.3g}}')
"""


def bench_verify_logits(work: Path, src: Path, hf: Path, args: argparse.Namespace) -> None:
    """Peak RSS and seconds of the streaming --verify-logits against the whole-model one."""
    _, interp = measured(["-c", "import megatron_sc2.convert.verify, transformers, safetensors"], work)
    measured(["convert", "to-hf", "--load", str(src), "--save", str(hf), "--dtype", args.dtype,
              "--max-shard-size", args.max_shard_size, "--no-progress"], work)
    round_to = "None" if args.dtype == "fp32" else {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[args.dtype]
    common = _VERIFY_COMMON.format(work=str(work), round_to=round_to)
    hf_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    rows = {}
    runs = [("streaming", _VERIFY_STREAMING)] + ([] if args.skip_whole_model else [("whole-model", _VERIFY_WHOLE)])
    for name, code in runs:
        secs, rss = measured(["-c", common + code.format()], work)
        rows[name] = dict(seconds=secs, peak_rss_gb=rss)
    print(f"HF export: {args.dtype}, {hf_bytes / 1e9:.2f} GB; interpreter + imports peak RSS: {interp:.2f} GB")
    print(f"{'verify-logits':<13} {'seconds':>8} {'peak RSS GB':>11} {'RSS - interp GB':>15}")
    for k, r in rows.items():
        print(f"{k:<13} {r['seconds']:>8.1f} {r['peak_rss_gb']:>11.2f} {r['peak_rss_gb'] - interp:>15.2f}")
    if "whole-model" in rows:
        ratio = (rows["whole-model"]["peak_rss_gb"] - interp) / (rows["streaming"]["peak_rss_gb"] - interp)
        print(f"RSS above the interpreter, whole-model / streaming: {ratio:.1f}x")
    print(json.dumps({"model": args.model, "num_layers": args.num_layers, "hidden_size": args.hidden_size,
                      "dtype": args.dtype, "interpreter_rss_gb": interp, **rows}))


def largest_file(d: Path, pattern: str) -> int:
    return max(f.stat().st_size for f in d.rglob(pattern))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="starcoder2-3b")
    ap.add_argument("--work", default="/tmp/megatron_sc2_bench_convert")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--verify-logits", action="store_true",
                    help="measure only --verify-logits: streaming against whole-model")
    ap.add_argument("--skip-whole-model", action="store_true",
                    help="with --verify-logits: only the streaming one (the whole-model one needs "
                         "two fp32 copies of the model: 24 GB for 3B)")
    ap.add_argument("--keep-work", action="store_true", help="with --verify-logits: keep WORK")
    ap.add_argument("--num-layers", type=int, help="override the preset's layer count")
    ap.add_argument("--hidden-size", type=int,
                    help="override the preset's width (ffn 4x, head dim 128, 4 query heads per kv head)")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src, hf, back = work / "ckpt", work / "hf", work / "ckpt_back"

    cfg = preset(args.model)
    if args.num_layers:
        cfg = dataclasses.replace(cfg, num_layers=args.num_layers)
    if args.hidden_size:
        heads = args.hidden_size // 128
        cfg = dataclasses.replace(cfg, hidden_size=args.hidden_size, ffn_hidden_size=4 * args.hidden_size,
                                  num_attention_heads=heads, num_query_groups=max(1, heads // 4))
    cfg = cfg.validate()
    t0 = time.perf_counter()
    nbytes = make_source(src, cfg)
    print(f"source: {args.model} ({cfg.num_layers} layers, hidden {cfg.hidden_size}) fp32 random "
          f"weights, {nbytes / 1e9:.2f} GB, written in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.verify_logits:
        bench_verify_logits(work, src, hf, args)
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        return
    _, interp = measured(["-c", "import megatron_sc2.convert.to_hf, megatron_sc2.convert.from_hf, "
                                "megatron_sc2.convert.main, safetensors"], work)

    cli = ["convert"]
    to_s, to_rss = measured(cli + ["to-hf", "--load", str(src), "--save", str(hf), "--dtype", args.dtype,
                                   "--max-shard-size", args.max_shard_size, "--no-progress"], work)
    to_shard = largest_file(hf, "*.safetensors")
    to_copy = copy_seconds(src, work / "copy_src")
    from_s, from_rss = measured(cli + ["from-hf", "--load", str(hf), "--save", str(back), "--no-progress"], work)
    from_shard = largest_file(back, "*.distcp")
    from_copy = copy_seconds(hf, work / "copy_hf")

    rows = {
        "to-hf": dict(seconds=to_s, peak_rss_gb=to_rss, largest_output_shard_gb=to_shard / 1e9,
                      rss_ratio=(to_rss - interp) / (to_shard / 1e9), copy_seconds=to_copy,
                      disk_ratio=to_s / to_copy,
                      gb_per_s=(nbytes + sum(f.stat().st_size for f in hf.glob("*.safetensors"))) / 1e9 / to_s),
        "from-hf": dict(seconds=from_s, peak_rss_gb=from_rss, largest_output_shard_gb=from_shard / 1e9,
                        rss_ratio=(from_rss - interp) / (from_shard / 1e9), copy_seconds=from_copy,
                        disk_ratio=from_s / from_copy,
                        gb_per_s=2 * sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 1e9 / from_s),
    }
    print(f"interpreter + imports peak RSS: {interp:.2f} GB")
    print(f"{'direction':<9} {'seconds':>8} {'peak RSS GB':>11} {'largest shard GB':>16} "
          f"{'rss_ratio':>9} {'copy s':>7} {'disk_ratio':>10} {'GB/s r+w':>8}")
    for k, r in rows.items():
        print(f"{k:<9} {r['seconds']:>8.1f} {r['peak_rss_gb']:>11.2f} {r['largest_output_shard_gb']:>16.2f} "
              f"{r['rss_ratio']:>9.2f} {r['copy_seconds']:>7.1f} {r['disk_ratio']:>10.2f} {r['gb_per_s']:>8.2f}")
    print(json.dumps({"model": args.model, "dtype": args.dtype, "interpreter_rss_gb": interp, **rows}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
