"""A rank that died or stopped answering, reported as one line instead of a collective's traceback.

When a peer dies, gloo fails the next collective at once ("Connection closed by peer"); when it
hangs, the process group's timeout (`--distributed-timeout-minutes`) fails it. Either way every
surviving rank raises from deep inside torch. `collective_failures()` turns that into a
`RankFailure` (a UserError: one line on stderr, exit status 2) naming this rank and what to look
for; under `srun --kill-on-bad-exit=1` slurm names the task that died ("task 1: Killed").
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

from megatron_sc2.errors import UserError

# Messages of collectives that failed because of another process (gloo, NCCL, the TCP store).
_PEER_FAILURE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Timed out|timed out|Timeout|"
    r"NCCL communicator was aborted|ProcessGroupNCCL|remote process exited|Socket Timeout|"
    r"failed to recv|failed to send|Connection refused", re.IGNORECASE)


class RankFailure(UserError):
    """Another rank of the job died or hung; this one cannot go on."""


def _world() -> tuple[int, int]:
    # From the launch variables, not the process group: that may be torn down by now.
    from megatron_sc2.parallel.env import detect

    env = detect()
    return env.rank, env.world_size


def describe(error: BaseException, rank: int, world: int) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first = re.sub(r"^\[[^\]]*\] ", "", first)  # drop gloo's source-location prefix
    return (f"rank {rank} of {world}: a collective with the other ranks failed ({first}); another "
            f"rank died or stopped responding -- look for the first error in the job's log "
            f"(srun names a dead task as 'task N')")


@contextlib.contextmanager
def collective_failures() -> Iterator[None]:
    """Run the body; a peer's death or hang becomes a one-line RankFailure."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # torch raises DistBackendError, DistNetworkError or RuntimeError
        rank, world = _world()
        if world <= 1:
            raise
        import torch.distributed as dist

        is_dist_error = isinstance(e, dist.DistError)
        if not (is_dist_error or (isinstance(e, RuntimeError) and _PEER_FAILURE.search(str(e)))):
            raise
        raise RankFailure(describe(e, rank, world)) from None
