"""Where this process sits in the job: from torchrun's variables or from slurm's.

`srun megatron-sc2 train ...` with one task per GPU (or CPU slot) needs no wrapper: rank, local
rank and world size come from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, the master address
is the first host of SLURM_JOB_NODELIST, and the port is derived from the job id (so two jobs on
one node do not collide) unless MASTER_PORT is set.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

from megatron_sc2.errors import ConfigError


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def export(self) -> None:
        """Set the variables torch.distributed's env:// rendezvous reads."""
        os.environ.update({
            "RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size), "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        })


def first_host(nodelist: str) -> str:
    """First host of a slurm node list: 'node[003-005,7],gpu1' -> 'node003'.

    Uses `scontrol show hostnames` when available, else expands the first entry itself.
    """
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ConfigError(f"cannot parse SLURM_JOB_NODELIST {nodelist!r}")
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer") from None


def detect(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """torchrun's variables win; then slurm's (only inside a step with several tasks); else one process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            world_size=_int(env, "WORLD_SIZE"), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500, source="torchrun")
    # Only inside an srun step (SLURM_STEP_NUM_TASKS is set by srun): the batch script itself
    # is one process even when the job has several tasks.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + job % 20000
        return LaunchEnv(
            rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            world_size=world, master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            master_port=port, source="slurm")
    return LaunchEnv(0, 0, 1, "127.0.0.1", 29500, "single")
