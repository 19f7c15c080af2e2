"""Asking slurm about jobs: is a controller up, a job's state, its tasks' pids, waiting for it.

Polls `squeue`/`scontrol` rather than `sbatch --wait` (which returns long after a short job ends).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                          "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"})


_WHOLE_LINE_KEYS = frozenset({"StdOut", "StdErr", "StdIn", "Command", "WorkDir", "Comment"})


def unavailable() -> Optional[str]:
    """None when a slurm controller answers here, else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "slurm is not installed (no sinfo/sbatch)"
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol ping failed: {e}"
    if "UP" not in out.stdout:
        return f"slurm controller is not UP: {(out.stdout or out.stderr).strip()}"
    return None


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...); {} if unknown."""
    out = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True,
                         text=True, timeout=30)
    info: dict[str, str] = {}
    for line in out.stdout.splitlines():
        line = line.strip()
        key = line.split("=", 1)[0]
        if key in _WHOLE_LINE_KEYS:  # paths may hold spaces: the value runs to the line's end
            info.setdefault(key, line.split("=", 1)[1])
            continue
        for m in re.finditer(r"(\w+)=(\S*)", line):
            info.setdefault(m.group(1), m.group(2))
    return info


def wait_until(cond: Callable[[], Optional[T]], timeout: float, what: str, poll: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def wait_job(job_id: str, timeout: float, poll: float = 0.3) -> dict[str, str]:
    """The job's info once it left the queue for good (a requeued job comes back PENDING first).
    On timeout the job is cancelled and TimeoutError raised."""
    def done() -> Optional[dict[str, str]]:
        info = job_info(job_id)
        return info if info.get("JobState") in FINAL_STATES else None

    try:
        return wait_until(done, timeout, f"slurm job {job_id} to finish", poll)
    except TimeoutError:
        subprocess.run(["scancel", str(job_id)], capture_output=True)
        raise


def job_output(info: dict[str, str]) -> str:
    path = Path(info.get("StdOut", ""))
    return path.read_text(errors="replace") if path.is_file() else f"(no output file {path})"


def task_pids(job_id: str) -> dict[int, list[int]]:
    """Global task rank -> pids of the job's step tasks (`scontrol listpids`, on this node)."""
    out = subprocess.run(["scontrol", "listpids", str(job_id)], capture_output=True, text=True,
                         timeout=30)
    pids: dict[int, list[int]] = {}
    for line in out.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 5 and parts[0].isdigit() and parts[4].isdigit():
            pids.setdefault(int(parts[4]), []).append(int(parts[0]))
    return pids
