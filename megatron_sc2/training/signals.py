"""Stop requests from outside the process, turned into "save a checkpoint, exit, maybe requeue".

A slurm job learns that its time is nearly up from `#SBATCH --signal=USR1@120`: slurm sends the
exit signal (`--exit-signal`, SIGUSR1 by default) to every task of the job's steps. Preemption and
`scancel` send SIGTERM, then SIGKILL after the cluster's KillWait. The handlers only record what
arrived; the training loop polls `StopRequests.poll()` once per step, where every rank agrees (an
all-reduce of MAX) so that all ranks stop after the same step and write the same checkpoint. After
that checkpoint is finished, rank 0 requeues the job (`scontrol requeue`) when the stop came from
the exit signal or from `--exit-duration-in-mins`, and training had not finished yet; the
requeued job resumes from the latest complete checkpoint in `--save`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

from megatron_sc2.config import parse_signal

# Bits of the flag vector the ranks all-reduce (MAX): which stop causes some rank has seen.
EXIT_SIGNAL, TERMINATE, DURATION = 0, 1, 2

# Signals received by this process, in order (the handler only appends here).
_RECEIVED: list[int] = []
# Who is listening: the run being started (install_early's token) and live trainers' StopRequests.
# With no listener left (a test process after its trainers are gone), a signal does what it
# would have done had we never installed a handler.
_listeners: "weakref.WeakSet[object]" = weakref.WeakSet()
_original: dict[int, object] = {}
# Set by install_early(): where the run's own signals start in _RECEIVED.
_early_mark: Optional[int] = None


def _record(signum: int, frame) -> None:
    if len(_listeners):
        # Only remember it: printing or saving inside a handler can re-enter I/O half-way.
        _RECEIVED.append(signum)
        return
    previous = _original.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install(signals: set[signal.Signals]) -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False  # signal.signal() only works there (a trainer in a thread only polls time)
    for sig in signals:
        previous = signal.signal(sig, _record)
        if previous is not _record:
            _original[sig] = previous
    return True


class _StartupToken:
    """Keeps the handlers recording while the run starts; drop it once the trainer exists."""


def install_early(cfg) -> _StartupToken:
    """Record the stop signals from the very start of `megatron-sc2 train` (importing torch and
    building the model take seconds; a signal then must not kill the process unsaved). Keep the
    returned token referenced until the trainer is built."""
    global _early_mark
    token = _StartupToken()
    if _install({parse_signal(getattr(cfg, "exit_signal", "SIGUSR1")), signal.SIGTERM}):
        _listeners.add(token)
        _early_mark = len(_RECEIVED)
    return token


@dataclass
class StopRequest:
    """Why the run stops early, and whether the job should run again to finish."""

    reason: str
    requeue: bool


@dataclass(eq=False)  # hashed by identity: kept in a WeakSet
class StopRequests:
    """Records stop signals and decides, with every rank, when and how the run stops."""

    exit_signal: signal.Signals = signal.SIGUSR1
    requeue: bool = True
    exit_duration_in_mins: Optional[float] = None
    start_time: float = field(default_factory=time.time)
    first_signal: int = 0  # index into _RECEIVED of the first signal that belongs to this run
    pending: Optional[StopRequest] = None

    @classmethod
    def from_config(cls, cfg, start_time: Optional[float] = None) -> "StopRequests":
        """Handlers for `cfg.exit_signal` and SIGTERM, installed now (main thread only)."""
        stops = cls(exit_signal=parse_signal(getattr(cfg, "exit_signal", "SIGUSR1")),
                    requeue=bool(getattr(cfg, "requeue", True)),
                    exit_duration_in_mins=cfg.exit_duration_in_mins,
                    start_time=time.time() if start_time is None else start_time)
        stops.install()
        return stops

    # ------------------------------------------------------------------------------- handlers
    def install(self) -> None:
        """Listen from now on (or from install_early's start, when that ran)."""
        global _early_mark
        self.first_signal = len(_RECEIVED) if _early_mark is None else _early_mark
        _early_mark = None
        if _install({self.exit_signal, signal.SIGTERM}):
            _listeners.add(self)

    def uninstall(self) -> None:
        """Stop listening (signals then act as if no handler had been installed)."""
        _listeners.discard(self)

    @property
    def received(self) -> list[int]:
        return _RECEIVED[self.first_signal:]

    # ---------------------------------------------------------------------------------- polling
    def _local_flags(self) -> list[int]:
        flags = [0, 0, 0]
        if self.exit_signal in self.received:
            flags[EXIT_SIGNAL] = 1
        if signal.SIGTERM in self.received and self.exit_signal != signal.SIGTERM:
            flags[TERMINATE] = 1
        limit = self.exit_duration_in_mins
        if limit is not None and (time.time() - self.start_time) / 60.0 >= limit:
            flags[DURATION] = 1
        return flags

    def poll(self, device=None) -> Optional[StopRequest]:
        """Called by every rank once per step: the stop all ranks agree on, or None."""
        flags = _agree(self._local_flags(), device)
        if not any(flags):
            return None
        if flags[TERMINATE]:
            # Preemption or scancel: save while there is time; the cluster decides about requeue.
            self.pending = StopRequest("SIGTERM received (preemption or scancel)", requeue=False)
        elif flags[EXIT_SIGNAL]:
            self.pending = StopRequest(f"{self.exit_signal.name} received (time limit near)",
                                       requeue=self.requeue)
        else:
            self.pending = StopRequest(f"--exit-duration-in-mins {self.exit_duration_in_mins} reached",
                                       requeue=self.requeue)
        return self.pending

    def after_save(self, rank: int, resumable: bool) -> bool:
        """After the final checkpoint of a stopped run: rank 0 requeues the slurm job when asked
        for and a requeued run has something left to do and a checkpoint to resume from.
        Returns True when the requeue was accepted."""
        stop = self.pending
        if stop is None or not stop.requeue or not resumable or rank != 0:
            return False
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return False
        return requeue_job(job)


def requeue_job(job_id: str) -> bool:
    """`scontrol requeue JOB`: slurm ends this run and queues the job again (same id, with
    SLURM_RESTART_COUNT + 1). Failures are reported, not raised: the checkpoint is safe anyway."""
    try:
        out = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"warning: could not requeue slurm job {job_id}: {e}", file=sys.stderr, flush=True)
        return False
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().replace("\n", " ")
        print(f"warning: `scontrol requeue {job_id}` failed: {msg} (submit with --requeue to allow it)",
              file=sys.stderr, flush=True)
        return False
    print(f"requeued slurm job {job_id}; it will resume from the latest checkpoint", flush=True)
    return True


def _agree(flags: list[int], device=None) -> list[int]:
    """Element-wise MAX of `flags` over all ranks (unchanged when not distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(flags, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]
