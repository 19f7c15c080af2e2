"""`megatron-sc2 clean --slurm N`: the clean as a slurm job chain -- a job array with one task per
shard (`clean ... --shard $SLURM_ARRAY_TASK_ID/N`) and a merge job that starts when every task
succeeded (`--dependency=afterok`, `--kill-on-invalid-dep=yes`: when a task fails the merge is
cancelled instead of waiting forever). Submitting the same command again re-runs only the shards
that are not finished: a finished shard's task sees its output and exits at once.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from argparse import Namespace
from pathlib import Path

from megatron_sc2.errors import UserError
from megatron_sc2.data.prep.clean.settings import CleanConfig

_OWN_FLAGS = {"--slurm": 1, "--partition": 1, "--account": 1, "--time": 1, "--cpus-per-task": 1,
              "--python": 1, "--dry-run": 0, "--workers": 1, "--hold": 0}


class SubmitError(UserError):
    """sbatch is missing or refused a job."""


def log_dir(cfg: CleanConfig) -> Path:
    """The scripts and slurm's output: DIR/slurm/ (kept after the merge removes the work files)."""
    return (Path(cfg.output) / "slurm").resolve()


def _clean_argv(argv: list[str]) -> list[str]:
    """The user's clean flags without the ones that describe the submission."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in _OWN_FLAGS:
            i += 1 + (_OWN_FLAGS[name] if "=" not in a else 0)
            continue
        out.append(a)
        i += 1
    return out


def _directive(flag: str, value: object) -> str:
    """One #SBATCH line; sbatch reads these itself (no shell): double quotes keep spaces."""
    text = str(value)
    if '"' in text or "\n" in text or "\r" in text:
        raise UserError(f"--{flag} {text!r} contains a double quote or a line break, which an #SBATCH line cannot hold")
    if re.search(r"\s|'|#", text):
        text = f'"{text}"'
    return f"#SBATCH --{flag}={text}"


def _pattern(directory: Path, name: str) -> str:
    """slurm's output file pattern: a '%' of the directory is literal."""
    return str(directory).replace("%", "%%") + "/" + name


def _header(args: Namespace, name: str, log: str) -> list[str]:
    lines = ["#!/bin/bash", _directive("job-name", name), _directive("output", log), _directive("ntasks", 1),
             _directive("cpus-per-task", args.cpus_per_task), _directive("time", args.time),
             _directive("chdir", os.getcwd())]
    if args.partition:
        lines.append(_directive("partition", args.partition))
    if args.account:
        lines.append(_directive("account", args.account))
    return lines


def scripts(cfg: CleanConfig, args: Namespace, argv: list[str]) -> tuple[str, str]:
    n = args.slurm
    if n < 1:
        raise UserError(f"--slurm must be at least 1, got {n}")
    logs = log_dir(cfg)
    base = [args.python, "-m", "megatron_sc2.cli", "clean", *_clean_argv(argv)]
    cmd = " ".join(shlex.quote(a) for a in base)
    env = "export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1"
    scan = _header(args, "sc2-clean-scan", _pattern(logs, "scan-%A_%a.out")) + [
        _directive("array", f"0-{n - 1}"), "set -euo pipefail", env,
        f"exec {cmd} --shard \"$SLURM_ARRAY_TASK_ID/{n}\""]
    merge = _header(args, "sc2-clean-merge", _pattern(logs, "merge-%j.out")) + [
        _directive("kill-on-invalid-dep", "yes"), "set -euo pipefail", env, f"exec {cmd} --merge {n}"]
    return "\n".join(scan) + "\n", "\n".join(merge) + "\n"


def _sbatch(path: Path, *extra: str) -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch not found on PATH (is slurm installed here?); use --dry-run to see the scripts")
    out = subprocess.run([sbatch, "--parsable", *extra, str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SubmitError(f"sbatch refused {path}: {(out.stderr or out.stdout).strip()}".replace("\n", " "))
    return out.stdout.strip().split(";")[0]


def submit_chain(cfg: CleanConfig, args: Namespace, argv: list[str]) -> str:
    """Write both scripts under DIR/.clean-work/slurm/ and submit them; the job ids, or with
    --dry-run the scripts."""
    scan, merge = scripts(cfg, args, argv)
    if args.dry_run:
        return f"# --- shard array\n{scan}# --- merge (after the array)\n{merge}"
    logs = log_dir(cfg)
    logs.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (("scan.sbatch", scan), ("merge.sbatch", merge)):
        p = logs / name
        tmp = p.with_name(p.name + f".tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, p)
        paths.append(p)
    array = _sbatch(paths[0], *(["--hold"] if args.hold else []))
    if not re.fullmatch(r"\d+", array):
        raise SubmitError(f"sbatch gave an unexpected job id {array!r}")
    merge_id = _sbatch(paths[1], f"--dependency=afterok:{array}")
    held = " (held: release it with `scontrol release`)" if args.hold else ""
    return f"submitted shard array {array} ({args.slurm} tasks){held} and merge job {merge_id}\n  logs: {logs}"
