"""`megatron-sc2 convert to-hf|from-hf` (also `python tools/convert_checkpoint.py`)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_sc2.errors import CommandLineParser, ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20 (Hugging Face's meaning of the units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS:
        raise ConfigError(f"--max-shard-size: cannot read {text!r} (examples: 5GB, 500MB, 2GiB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise ConfigError(f"--max-shard-size must be positive, got {text!r}")
    return size


def _parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="megatron-sc2 convert",
                                description="Convert checkpoints to and from Hugging Face format.")
    sub = p.add_subparsers(dest="direction", required=True)

    t = sub.add_parser("to-hf", help="our checkpoint (any parallel layout) -> HF directory")
    t.add_argument("--load", required=True, help="checkpoint save directory (or one iter_XXXXXXX directory)")
    t.add_argument("--iteration", "--ckpt-step", dest="iteration", type=int,
                   help="iteration to export (default: the latest finished one)")
    t.add_argument("--save", required=True, help="output HF directory")
    t.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="dtype of the exported weights (default: the dtype the checkpoint stores)")
    t.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    t.add_argument("--tokenizer", help="tokenizer to export (default: the one recorded in meta.json)")
    t.add_argument("--verify-logits", action="store_true",
                   help="after writing, compare our model's logits with transformers' on the output")
    t.add_argument("--force", action="store_true",
                   help="replace an existing output directory even if it is not a previous export")
    _progress_flags(t)

    f = sub.add_parser("from-hf", help="HF StarCoder2 directory -> our model-only checkpoint (iteration 0)")
    f.add_argument("--load", required=True, help="HF directory (config.json + safetensors)")
    f.add_argument("--save", required=True, help="checkpoint save directory to create")
    f.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="dtype to store (default: the dtype of the HF shards)")
    f.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="checked against the model; the checkpoint itself loads under any layout")
    f.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    f.add_argument("--verify-logits", action="store_true",
                   help="after writing, compare our model's logits with transformers' on the source")
    _progress_flags(f)
    return p


def _progress_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="always show the progress bar (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.direction == "to-hf":
        from megatron_sc2.convert.to_hf import ToHFOptions, to_hf

        r = to_hf(ToHFOptions(
            load=Path(args.load), save=Path(args.save), iteration=args.iteration, dtype=args.dtype,
            max_shard_size=parse_size(args.max_shard_size), tokenizer=args.tokenizer,
            verify_logits=args.verify_logits, force=args.force, progress=args.progress))
        print(f"exported {r.checkpoint} -> {r.out_dir}: {r.num_tensors} tensors, "
              f"{r.total_bytes / 1e6:.1f} MB in {len(r.shards)} shard(s), {r.seconds:.1f} s; "
              f"tokenizer: {r.tokenizer or 'none (pass --tokenizer)'}"
              + (f"; logits max diff {r.logits_max_diff:.2e}" if r.logits_max_diff is not None else ""))
        if not r.tokenizer:
            print("warning: no tokenizer recorded in the checkpoint; AutoTokenizer will not load "
                  f"{r.out_dir} until tokenizer files are added", file=sys.stderr)
    else:
        from megatron_sc2.convert.from_hf import FromHFOptions, from_hf

        r = from_hf(FromHFOptions(
            load=Path(args.load), save=Path(args.save), dtype=args.dtype,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            verify_logits=args.verify_logits, progress=args.progress))
        print(f"converted {args.load} -> {r.checkpoint}: {r.num_tensors} tensors "
              f"({', '.join(r.dtypes)}), {r.total_bytes / 1e6:.1f} MB, {r.seconds:.1f} s; "
              f"continue with: megatron-sc2 train --load {args.save} ..."
              + (f"; logits max diff {r.logits_max_diff:.2e}" if r.logits_max_diff is not None else ""))
    return 0


if __name__ == "__main__":
    from megatron_sc2.errors import run_user_main

    sys.exit(run_user_main(main, sys.argv[1:], prog="megatron-sc2 convert"))
