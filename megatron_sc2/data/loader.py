"""This rank's batches, built ahead in background threads while the current step runs.

A step consumes the global batch of samples `first .. first + global_batch_size - 1` (global
sample indices, so a resumed run reads exactly what the uninterrupted one would). In Megatron's
order each micro-batch is `micro_batch_size x dp` consecutive samples split by data-parallel
rank; this rank's micro-batches, one after the other, form its local batch of
`num_micro_batches x micro_batch_size` rows, built here as one tensor (the engine splits it into
micro-batches once). Gathering the samples (and the FIM transform inside the dataset) runs in
up to `num_workers` threads, each building one upcoming step (0: built when asked, in the
caller's thread). On CUDA the batch is pinned in the worker and copied with non_blocking=True.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megatron_sc2.data.batch import get_batch

Batch = dict[str, Optional[torch.Tensor]]


@dataclass(frozen=True)
class BatchPlan:
    """Which samples of a global batch this rank takes, and how they become model inputs."""

    micro_batch_size: int
    num_micro_batches: int
    dp_rank: int
    dp_size: int
    eod: int
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_micro_batches * self.dp_size

    def sample_indices(self, first: int) -> list[int]:
        mbs, dp = self.micro_batch_size, self.dp_size
        return [first + m * mbs * dp + self.dp_rank * mbs + j
                for m in range(self.num_micro_batches) for j in range(mbs)]


class BatchLoader:
    """`get(first, next_first)` returns the local batch of the global batch starting at sample
    `first` and starts building the one at `next_first` (the next step) in the background.

    num_workers 0: every batch is built when asked, in the caller's thread. N > 0: the next
    batch is built by a background thread while the caller computes (torch's kernels release
    the GIL), its samples gathered by N threads (memory-mapped reads and numpy overlap; the
    Python-level FIM transform shares the GIL)."""

    def __init__(self, dataset: Sequence[Any], plan: BatchPlan, device: torch.device,
                 num_workers: int = 0):
        self.dataset, self.plan, self.device = dataset, plan, device
        self.num_workers = max(0, int(num_workers))
        self._prefetch = (ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch")
                          if self.num_workers else None)
        self._gather = (ThreadPoolExecutor(self.num_workers, thread_name_prefix="batch-gather")
                        if self.num_workers > 1 else None)
        self._ahead: dict[int, Future] = {}

    def _sample(self, index: int) -> np.ndarray:
        return np.asarray(self.dataset[index], dtype=np.int64)

    def build(self, first: int) -> Batch:
        """The local batch on the host (pinned when the device is CUDA)."""
        indices = self.plan.sample_indices(first)
        if self._gather is not None:
            rows = list(self._gather.map(self._sample, indices))
        else:
            rows = [self._sample(i) for i in indices]
        p = self.plan
        batch = get_batch(torch.from_numpy(np.stack(rows)), p.eod, p.reset_position_ids,
                          p.reset_attention_mask, p.eod_mask_loss)
        if self.device.type == "cuda":
            batch = {k: (v.pin_memory() if v is not None else None) for k, v in batch.items()}
        return batch

    def get(self, first: int, next_first: Optional[int] = None) -> Batch:
        future = self._ahead.pop(first, None)
        for stale in self._ahead.values():  # asked for something else than was built ahead
            stale.cancel()
        self._ahead.clear()
        batch = future.result() if future is not None else self.build(first)
        if next_first is not None and self._prefetch is not None:
            self._ahead[next_first] = self._prefetch.submit(self.build, next_first)
        return {k: (v.to(self.device, non_blocking=True) if v is not None else None)
                for k, v in batch.items()}

    def close(self) -> None:
        for f in self._ahead.values():
            f.cancel()
        self._ahead.clear()
        for pool in (self._prefetch, self._gather):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._prefetch = self._gather = None
