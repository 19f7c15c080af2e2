"""Sharded index builds on slurm: one job array whose task i runs the build with `--shard auto`
(shard `SLURM_ARRAY_TASK_ID` of `SLURM_ARRAY_TASK_COUNT`), then a merge job that starts only
after every task succeeded (`--dependency=afterok`). Both scripts are written next to the logs
so they can be read and resubmitted; every argument in them is quoted with shlex.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_sc2.errors import ConfigError


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
                   dry_run: bool = False) -> ArraySubmission:
    """Submit `megatron-sc2 TOOL build BUILD_ARGS --shard auto` as an array of `shards` tasks and
    `megatron-sc2 TOOL merge MERGE_ARGS` after it."""
    if shards < 1:
        raise ConfigError(f"--submit-shards must be at least 1, got {shards}")
    log_dir = log_dir.resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "megatron_sc2.cli", tool]
    workdir = Path.cwd()
    array = _script(_directives(f"{tool}-build", str(log_dir / f"{tool}-build-%A_%a.out"), time, partition, cpus)
                    + [f"#SBATCH --array=0-{shards - 1}"], [*py, "build", *build_args, "--shard", "auto"], workdir)
    merge = _script(_directives(f"{tool}-merge", str(log_dir / f"{tool}-merge-%j.out"), time, partition, None),
                    [*py, "merge", *merge_args], workdir)
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
