"""Where this process sits in the job (torchrun's variables or slurm's), and the one
process-group start-up and tear-down built on it.

`srun megatron-sc2 train ...` with one task per GPU (or CPU slot) needs no wrapper: rank, local
rank and world size come from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, the master address
is the first host of SLURM_JOB_NODELIST, and the port is derived from the job id (so two jobs on
one node do not collide) unless MASTER_PORT is set.

Timeouts are always set so that a rank waiting on a dead peer fails instead of hanging; gloo
also notices a closed connection at once. Tear-down follows the gloo + DTensor caveat: drop
references and collect garbage before destroying the group. torch is imported only there, so
that job submission can read the launch environment without it.
"""

from __future__ import annotations

import gc
import os
import re
import subprocess
from datetime import timedelta
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

from megatron_sc2.errors import ConfigError

if TYPE_CHECKING:
    import torch


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


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables, else an srun step's, else (0, 0, 1)."""
    env = detect()
    if env.distributed and env.source == "slurm":
        env.export()  # MASTER_ADDR/PORT for env:// rendezvous
    return env.rank, env.local_rank, env.world_size


def init_distributed(timeout_minutes: float = 10.0, device: Optional[str] = None) -> "torch.device":
    """Initialize the default process group (gloo on CPU, nccl on CUDA) if the launch has more
    than one process or a rendezvous address; returns this rank's device."""
    import torch
    import torch.distributed as dist

    rank, local_rank, world = world_from_env()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError(
                f"world size {world} but MASTER_ADDR is not set: launch with torchrun or srun")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_minutes),
                                device_id=dev if dev.type == "cuda" else None)
    return dev


def shutdown_distributed() -> None:
    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
