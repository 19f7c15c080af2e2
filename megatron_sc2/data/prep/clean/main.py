"""`megatron-sc2 clean`: dedup, PII redaction, decontamination and filters before `preprocess`.

    megatron-sc2 clean --input IN... --output DIR [--all | --exact-dedup --near-dedup --pii
        --decontaminate [BENCH.jsonl ...] --licenses permissive,no_license --languages python,java
        --path-filters] [--workers N | --shard i/N | --merge N | --slurm N [--partition P ...]]

Writes `DIR/part-i-of-N.jsonl` (the input's records, text redacted where PII was found; what
`preprocess` reads, with the same flags as for the input), `DIR/report.json` and
`DIR/manifest.jsonl`. By default every core runs one shard, then the merge runs here.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megatron_sc2.errors import CommandLineParser, ConfigError
from megatron_sc2.data.prep.clean.filters import parse_languages, parse_licenses
from megatron_sc2.data.prep.clean.languages import CORE_LANGUAGES
from megatron_sc2.data.prep.clean.report import summary_lines
from megatron_sc2.data.prep.clean.runner import merge, run_local, scan_shard
from megatron_sc2.data.prep.clean.settings import CleanConfig


def build_parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="megatron-sc2 clean", description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL (plain/.gz/.zst), parquet, directories of repositories; globs allowed")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--json-keys", nargs="+", default=None,
                   help="the text field (default: content if present, else text)")
    p.add_argument("--skip-malformed", action="store_true", help="skip (and count) malformed lines instead of stopping")
    g = p.add_argument_group("stages (each alone, or --all with StarCoder2's settings)")
    g.add_argument("--all", action="store_true",
                   help="every stage: exact and near dedup, PII, HumanEval decontamination, path filters, "
                        "licences permissive,no_license (languages only when --languages is given)")
    g.add_argument("--exact-dedup", action="store_true")
    g.add_argument("--near-dedup", action="store_true")
    g.add_argument("--near-verify", type=float, default=0.7,
                   help="keep an LSH candidate pair only when its signatures agree on this fraction (0: off)")
    g.add_argument("--pii", action="store_true")
    g.add_argument("--decontaminate", nargs="*", default=None, metavar="BENCH_JSONL",
                   help="HumanEval plus these JSON lines benchmark files")
    g.add_argument("--licenses", nargs="+", default=None, help="licence types to keep (license_type column)")
    g.add_argument("--languages", nargs="+", default=None,
                   help=f"languages to keep ('core' = {','.join(CORE_LANGUAGES)})")
    g.add_argument("--path-filters", action="store_true", help="drop vendored and generated files")
    r = p.add_argument_group("running")
    r.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shards run here at once (default: all cores)")
    r.add_argument("--shard", default=None, metavar="i/N", help="run shard i of N only (then --merge N)")
    r.add_argument("--merge", type=int, default=None, metavar="N", help="merge N finished shards")
    r.add_argument("--slurm", type=int, default=None, metavar="N",
                   help="submit a job array of N shards and a dependent merge job")
    r.add_argument("--partition")
    r.add_argument("--account")
    r.add_argument("--time", default="04:00:00")
    r.add_argument("--cpus-per-task", type=int, default=1)
    r.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes")
    r.add_argument("--dry-run", action="store_true", help="with --slurm: print the scripts, submit nothing")
    r.add_argument("--hold", action="store_true", help="with --slurm: submit the shard array held (scontrol release)")
    r.add_argument("--keep-work", action="store_true", help="keep DIR/.clean-work after the merge")
    return p


def config_from_args(args: argparse.Namespace) -> CleanConfig:
    languages = parse_languages(args.languages) if args.languages else None
    licenses = parse_licenses(args.licenses) if args.licenses else None
    if args.all and licenses is None:
        licenses = ("permissive", "no_license")
    cfg = CleanConfig(
        inputs=list(args.input), output=args.output,
        text_key=args.json_keys[0] if args.json_keys else None, skip_malformed=args.skip_malformed,
        exact_dedup=args.exact_dedup or args.all, near_dedup=args.near_dedup or args.all,
        near_verify=args.near_verify, pii=args.pii or args.all,
        decontaminate=args.decontaminate is not None or args.all,
        benchmark_files=list(args.decontaminate or []), licenses=licenses, languages=languages,
        path_filters=args.path_filters or args.all)
    cfg.check()
    if args.json_keys and len(args.json_keys) > 1:
        raise ConfigError("clean: --json-keys takes one text field")
    if cfg.decontaminate:  # a bad benchmark file fails now, before any shard runs
        from megatron_sc2.data.prep.clean.decontaminate import Decontaminator
        Decontaminator.build(True, cfg.benchmark_files)
    from megatron_sc2.data.prep.sources import expand_inputs
    expand_inputs(cfg.inputs)  # a missing input fails here
    return cfg


def _parse_shard(spec: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {spec}: expected i/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {spec}: need N >= 1 and 0 <= i < N")
    return i, n


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    modes = sum(x is not None for x in (args.shard, args.merge, args.slurm))
    if modes > 1:
        raise ConfigError("clean: give at most one of --shard, --merge, --slurm")
    cfg = config_from_args(args)
    if args.shard is not None:
        i, n = _parse_shard(args.shard)
        status = scan_shard(cfg, i, n)
        print(f"shard {i}/{n}: {status}", file=sys.stderr)
        return 0
    if args.slurm is not None:
        from megatron_sc2.data.prep.clean.slurm_chain import submit_chain
        result = submit_chain(cfg, args, list(argv if argv is not None else sys.argv[1:]))
        print(result, file=sys.stdout if args.dry_run else sys.stderr)
        return 0
    if args.merge is not None:
        if args.merge < 1:
            raise ConfigError(f"--merge must be at least 1, got {args.merge}")
        result = merge(cfg, args.merge, args.keep_work)
    else:
        result = run_local(cfg, args.workers, args.keep_work)
    for line in summary_lines(result.report):
        print(line, file=sys.stderr)
    print(f"wrote {len(result.outputs)} shard(s), report.json and manifest.jsonl to {cfg.output}", file=sys.stderr)
    return 0
