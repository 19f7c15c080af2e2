"""Process-group start-up and tear-down for torchrun or srun launches.

Timeouts are always set so that a rank waiting on a dead peer fails instead of hanging; gloo
also notices a closed connection at once. Tear-down follows the gloo + DTensor caveat: drop
references and collect garbage before destroying the group.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sc2.errors import ConfigError


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables, else an srun step's, else (0, 0, 1)."""
    from megatron_sc2.launch.env import detect

    env = detect()
    if env.distributed and env.source == "slurm":
        env.export()  # MASTER_ADDR/PORT for env:// rendezvous
    return env.rank, env.local_rank, env.world_size


def init_distributed(timeout_minutes: float = 10.0, device: Optional[str] = None) -> torch.device:
    """Initialize the default process group (gloo on CPU, nccl on CUDA) if the launch has more
    than one process or a rendezvous address; returns this rank's device."""
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
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
