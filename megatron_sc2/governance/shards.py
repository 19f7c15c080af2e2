"""Sharded index builds: which documents shard i of N holds, `--shard i/N|auto`, and on slurm
one job array whose task i runs the build with `--shard auto` (shard `SLURM_ARRAY_TASK_ID` of
`SLURM_ARRAY_TASK_COUNT`), then a merge job that starts only after every task succeeded
(`--dependency=afterok`). Both scripts are written next to the logs so they can be read and
resubmitted; every argument in them is quoted with shlex.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from megatron_sc2.errors import ConfigError

if TYPE_CHECKING:
    import argparse

    from megatron_sc2.data.indexed import IndexedDataset


@dataclass
class ArraySubmission:
    array_script: Path
    merge_script: Path
    array_job: Optional[str] = None   # None on --dry-run
    merge_job: Optional[str] = None


def _script(lines: Sequence[str], command: Sequence[str], workdir: Path) -> str:
    body = ["#!/bin/bash", *lines, "set -euo pipefail", f"cd {shlex.quote(str(workdir))}",
            "exec " + " ".join(shlex.quote(c) for c in command), ""]
    return "\n".join(body)


def _directives(name: str, log: str, time: Optional[str], partition: Optional[str], cpus: Optional[int]) -> list[str]:
    for what, v in (("job name", name), ("log directory", log), ("--partition", partition), ("--time", time)):
        if v is not None and any(c in v for c in '"\n\r'):
            raise ConfigError(f"{what} {v!r} contains a double quote or a line break, which an #SBATCH line cannot hold")
    out = [f'#SBATCH --job-name="{name}"', f'#SBATCH --output="{log}"', "#SBATCH --ntasks=1"]
    if cpus:
        out.append(f"#SBATCH --cpus-per-task={cpus}")
    if time:
        out.append(f"#SBATCH --time={time}")
    if partition:
        out.append(f'#SBATCH --partition="{partition}"')
    return out


def submit_sharded(tool: str, build_args: Sequence[str], merge_args: Sequence[str], shards: int, log_dir: Path,
                   time: Optional[str] = None, partition: Optional[str] = None, cpus: Optional[int] = None,
                   dry_run: bool = False, build_sub: Sequence[str] = ("build",),
                   merge_sub: Sequence[str] = ("merge",)) -> ArraySubmission:
    """Submit `megatron-sc2 TOOL build BUILD_ARGS --shard auto` as an array of `shards` tasks and
    `megatron-sc2 TOOL merge MERGE_ARGS` after it (a tool without subcommands, like `remove`,
    passes empty `build_sub`/`merge_sub` and says `--merge` in MERGE_ARGS)."""
    if shards < 1:
        raise ConfigError(f"--submit-shards must be at least 1, got {shards}")
    log_dir = log_dir.resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "megatron_sc2.cli", tool]
    workdir = Path.cwd()
    array = _script(_directives(f"{tool}-build", str(log_dir / f"{tool}-build-%A_%a.out"), time, partition, cpus)
                    + [f"#SBATCH --array=0-{shards - 1}"], [*py, *build_sub, *build_args, "--shard", "auto"], workdir)
    merge = _script(_directives(f"{tool}-merge", str(log_dir / f"{tool}-merge-%j.out"), time, partition, None),
                    [*py, *merge_sub, *merge_args], workdir)
    sub = ArraySubmission(log_dir / f"{tool}-build.sbatch", log_dir / f"{tool}-merge.sbatch")
    sub.array_script.write_text(array)
    sub.merge_script.write_text(merge)
    if dry_run:
        return sub
    sub.array_job = _sbatch([str(sub.array_script)])
    sub.merge_job = _sbatch([f"--dependency=afterok:{sub.array_job}", "--kill-on-invalid-dep=yes",
                             str(sub.merge_script)])
    return sub


def _sbatch(args: Sequence[str]) -> str:
    try:
        out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ))
    except FileNotFoundError:
        raise ConfigError("--submit-shards: sbatch not found (is slurm installed here?)") from None
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise ConfigError(f"sbatch {args[-1]}: {msg[-1] if msg else f'exit status {out.returncode}'}")
    return out.stdout.strip().split(";")[0]


def document_ranges(datasets: Sequence["IndexedDataset"], shard: int = 0, num_shards: int = 1) -> list[tuple[int, int, int]]:
    """(dataset, first document, end document) of one shard: the documents of all datasets in
    order, cut into `num_shards` contiguous, nearly equal parts."""
    total = sum(d.num_documents for d in datasets)
    a, b = total * shard // num_shards, total * (shard + 1) // num_shards
    out = []
    base = 0
    for i, d in enumerate(datasets):
        lo, hi = max(a - base, 0), min(b - base, d.num_documents)
        if lo < hi:
            out.append((i, lo, hi))
        base += d.num_documents
    return out


def parse_shard(spec: Optional[str]) -> Optional[tuple[int, int]]:
    """`i/N` (0-based), or `auto`: slurm's array task id and count (absent: no sharding)."""
    if spec is None:
        return None
    if spec == "auto":
        tid, count = os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_ARRAY_TASK_COUNT")
        if tid is None or count is None:
            raise ConfigError("--shard auto: not a slurm array task (SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT unset)")
        lo = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(tid) - lo, int(count)
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {spec}: expected i/N (0 <= i < N) or auto") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {spec}: expected i/N with 0 <= i < N")
    return i, n


def add_submit_flags(b: "argparse.ArgumentParser") -> None:
    g = b.add_argument_group("slurm (a job array of shards, then a merge job)")
    g.add_argument("--submit-shards", type=int, default=None, metavar="N",
                   help="submit N array tasks (each --shard auto) and a merge job after them")
    g.add_argument("--logs", default=None, help="where the sbatch scripts and logs go (default OUTPUT/slurm)")
    g.add_argument("--time", default=None, help="slurm time limit of each job")
    g.add_argument("--partition", default=None)
    g.add_argument("--dry-run", action="store_true", help="write the scripts, submit nothing")


def submit_main(tool: str, args: "argparse.Namespace", build_args: list[str], merge_args: list[str],
                logs: Optional[Path] = None, **sub_words) -> int:
    """Submit the array and its merge job (`submit_sharded`) and report them; `logs` defaults
    to OUTPUT/slurm, `sub_words` (build_sub, merge_sub) to the tool's build/merge subcommands."""
    if args.shard is not None:
        raise ConfigError("--submit-shards and --shard exclude each other (each array task gets --shard auto)")
    sub = submit_sharded(tool, build_args, merge_args, args.submit_shards,
                         Path(args.logs or logs or Path(args.output) / "slurm"), args.time, args.partition,
                         dry_run=args.dry_run, **sub_words)
    if args.dry_run:
        print(f"wrote {sub.array_script} and {sub.merge_script} (not submitted)", file=sys.stderr)
    else:
        print(f"submitted array job {sub.array_job} ({args.submit_shards} shards) and merge job {sub.merge_job}",
              file=sys.stderr)
        print(sub.merge_job)
    return 0
