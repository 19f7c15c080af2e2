"""The sbatch script of a training job: what it asks slurm for, and how it starts every rank.

The script is meant to be read and resubmitted by people: `#SBATCH` lines for the allocation,
`--signal` so the run saves before its time limit, `--requeue` and `--open-mode=append` so a
requeued run resumes and keeps one log, then one `srun` line that starts one task per GPU (or CPU
slot). Values in `#SBATCH` lines are never seen by a shell; everything in the shell part is
quoted with shlex, so a name like `a b $(rm -rf x)` stays literal.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional, Sequence

from megatron_sc2.errors import ConfigError

_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_SIGNAL_RE = re.compile(r"^(?:(B|R|RB|BR):)?([A-Za-z0-9]+)(?:@(\d+))?$")


@dataclass
class JobSpec:
    """Everything the script asks of slurm, and the training command it runs."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int = 0                  # 0: a CPU job
    cpus_per_task: Optional[int] = None
    time: Optional[str] = None              # slurm's formats: MM, HH:MM:SS, D-HH:MM, ...
    partition: Optional[str] = None
    account: Optional[str] = None
    job_name: str = "starcoder2"
    signal: str = "USR1@120"                # slurm's --signal=[R:]SIG@SECONDS (not B:)
    output: str = "slurm-%j.out"            # slurm file pattern (%j = job id)
    workdir: str = "."
    train_command: list[str] = field(default_factory=list)
    resume_dir: Optional[str] = None        # --save: the requeued run loads from here
    initial_load: Optional[str] = None      # --load of the first run when it differs from --save
    layout_comment: str = ""

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def validate(self) -> "JobSpec":
        for name, value in (("--nodes", self.nodes), ("--ntasks-per-node", self.tasks_per_node)):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node must be positive, got {self.gpus_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task <= 0:
            raise ConfigError(f"--cpus-per-task must be positive, got {self.cpus_per_task}")
        if self.time is not None and not _TIME_RE.match(self.time):
            raise ConfigError(f"--time {self.time!r} is not a slurm time (MM, HH:MM:SS or D-HH:MM:SS)")
        signal_seconds(self.signal)
        if self.time is not None and signal_seconds(self.signal) >= time_seconds(self.time):
            raise ConfigError(f"--signal {self.signal} comes before the job even starts: its time "
                              f"limit --time {self.time} is not longer than that")
        for name, value in (("--job-name", self.job_name), ("--partition", self.partition),
                            ("--account", self.account), ("log directory", self.output)):
            if value is not None and ('"' in value or "\n" in value or "\r" in value):
                raise ConfigError(f"{name} {value!r} contains a double quote or a line break, which an "
                                  f"#SBATCH line cannot hold")
        if not self.train_command:
            raise ConfigError("no training command to run")
        return self


def signal_name(spec: str) -> str:
    """'USR1@120' -> 'USR1' (the part slurm sends)."""
    m = _SIGNAL_RE.match(spec.strip())
    if not m:
        raise ConfigError(f"--signal {spec!r} is not slurm's SIG@SECONDS (e.g. USR1@120)")
    if m.group(1) and "B" in m.group(1):
        raise ConfigError(f"--signal {spec!r}: the B: prefix signals only the batch shell, not the "
                          f"training processes; leave it out")
    name = m.group(2).upper()
    return name[3:] if name.startswith("SIG") else name


def signal_seconds(spec: str) -> int:
    signal_name(spec)
    m = _SIGNAL_RE.match(spec.strip())
    assert m is not None
    return int(m.group(3)) if m.group(3) else 60  # slurm's default lead time


def time_seconds(spec: str) -> int:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days = 0
    if "-" in spec:
        d, spec = spec.split("-", 1)
        days = int(d)
        parts = [int(p) for p in spec.split(":")] + [0] * (3 - len(spec.split(":")))
        h, m, s = parts[:3]
    else:
        parts = [int(p) for p in spec.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts
    return ((days * 24 + h) * 60 + m) * 60 + s


def _directive(flag: str, value: object) -> str:
    text = str(value)
    # sbatch reads #SBATCH lines itself (no shell): double quotes keep spaces inside one value.
    if re.search(r"\s|'|#", text):
        text = f'"{text}"'
    return f"#SBATCH --{flag}={text}"


def render(spec: JobSpec, when: Optional[datetime] = None) -> str:
    """The sbatch script text."""
    spec.validate()
    when = when or datetime.now(timezone.utc)
    q = shlex.quote
    kind = (f"{spec.nodes} node(s) x {spec.gpus_per_node} GPU(s) = {spec.world_size} ranks"
            if spec.gpus_per_node else
            f"{spec.nodes} node(s) x {spec.tasks_per_node} CPU task(s) = {spec.world_size} ranks")
    lines = [
        "#!/bin/bash",
        f"# StarCoder2 training job, written by `megatron-sc2 submit` on {when:%Y-%m-%d %H:%M} UTC.",
        "# Submit it again unchanged with: sbatch <this file>",
        f"# {kind}{': ' + spec.layout_comment if spec.layout_comment else ''}",
        f"# {signal_seconds(spec.signal)} s before the time limit slurm sends SIG{signal_name(spec.signal)} to every",
        "# rank: they save a checkpoint, exit, and the job requeues itself; the requeued run",
        "# resumes from the latest complete checkpoint (same data position and RNG state).",
        _directive("job-name", spec.job_name),
        _directive("nodes", spec.nodes),
        _directive("ntasks-per-node", spec.tasks_per_node),
    ]
    if spec.gpus_per_node:
        lines.append(_directive("gpus-per-node", spec.gpus_per_node))
    if spec.cpus_per_task:
        lines.append(_directive("cpus-per-task", spec.cpus_per_task))
    if spec.time:
        lines.append(_directive("time", spec.time))
    if spec.partition:
        lines.append(_directive("partition", spec.partition))
    if spec.account:
        lines.append(_directive("account", spec.account))
    lines += [
        _directive("signal", spec.signal),
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        _directive("output", spec.output),
        "",
        "set -euo pipefail",
        f"cd {q(spec.workdir)}",
        "",
        "# One thread per task unless slurm gave the task several CPUs.",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        "# Rendezvous on the first node; the port follows the job id, so jobs sharing a node differ.",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        'export MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"',
        'echo "[$(date -u +%FT%TZ)] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"',
        "",
    ]
    resume: list[str] = []
    if spec.resume_dir and spec.initial_load:
        lines += [
            "# The first run loads --load; a requeued run resumes from its own --save instead.",
            "RESUME=()",
            f"if [ -s {q(spec.resume_dir + '/latest_checkpointed_iteration.txt')} ]; then",
            f"    RESUME=(--load {q(spec.resume_dir)} --no-finetune)",
            "fi",
            "",
        ]
        resume = ['"${RESUME[@]}"']
    lines.append("# --kill-on-bad-exit: a rank that dies ends the whole step at once instead of a hang.")
    cmd = ["srun", "--kill-on-bad-exit=1", *[q(a) for a in spec.train_command], *resume]
    lines.append(_wrap(cmd))
    return "\n".join(lines) + "\n"


def _wrap(words: Sequence[str], width: int = 96) -> str:
    """Shell words on continuation lines, a flag and its value kept together."""
    groups: list[str] = []
    for w in words:
        if groups and not w.startswith("-") and groups[-1].startswith("--") and not re.search(r"[ =]", groups[-1]):
            groups[-1] += " " + w
        else:
            groups.append(w)
    out, line = [], ""
    for g in groups:
        if line and len(line) + 1 + len(g) > width:
            out.append(line + " \\")
            line = "    " + g
        else:
            line = f"{line} {g}" if line else g
    out.append(line)
    return "\n".join(out)
