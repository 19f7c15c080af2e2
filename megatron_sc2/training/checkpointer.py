"""The checkpoint state of a run: save (blocking or --async-save), poll, wait, load.

The format (directories, meta.json, the atomic finalize, the tied-embedding key rule) is in
training/checkpoint.py, which convert/ reads too; this module holds what a running job needs
besides: the state dicts of this rank's model and optimizer, the one save in flight, the
process group its writer thread uses, and what a resumed run restores (weights, optimizer,
iteration, RNG). All ranks call save/poll/wait/load at the same points.
"""

from __future__ import annotations

import datetime
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from megatron_sc2.config import ModelConfig, TrainConfig
from megatron_sc2.errors import CheckpointError
from megatron_sc2.parallel.layout import ParallelLayout
from megatron_sc2.training import checkpoint as ckpt
from megatron_sc2.training.checkpoint import PendingSave, TrainState

# Optimizer state flattened per parameter (`state.<fqn>.exp_avg`, `param_groups.<fqn>.lr`), so
# ranks holding different parameters never write the same key.
_SD_OPTIONS = dict(flatten_optimizer_state_dict=True)


# ------------------------------------------------------------------ RNG and DCP reading
def save_rng(ckpt_dir: Path, rank: int) -> None:
    """This rank's RNG state (torch and numpy; no pickled objects: checkpoint.save_rng_state)."""
    ckpt.save_rng_state(ckpt_dir / "rng" / f"rank_{rank}.pt")


def load_rng(ckpt_dir: Path, rank: int) -> None:
    """Restore this rank's RNG state if the checkpoint has one for it (unexecuted reading)."""
    rng_file = ckpt_dir / "rng" / f"rank_{rank}.pt"
    if rng_file.is_file():
        ckpt.load_rng_state(rng_file)


def load_dcp(sd: dict[str, Any], ckpt_dir: Path) -> None:
    """DCP's load through the checkpoint format's restricted reader (checkpoint.load_dcp)."""
    ckpt.load_dcp(sd, ckpt_dir)


@dataclass
class Checkpointer:
    cfg: TrainConfig
    model_cfg: ModelConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    layout: ParallelLayout
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    holds_tied_copy: bool = False  # a last pipeline stage with its own copy of the tied embedding
    _pending: Optional[PendingSave] = None
    _group: Any = None

    # ---------------------------------------------------------------- helpers
    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _nonce(self) -> str:
        """Rank 0's pid, agreed by every rank (they all write into the same temporary dir)."""
        if self.world_size == 1:
            return str(os.getpid())
        box = [os.getpid()]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])

    def _stored(self, sd: dict[str, Any]) -> dict[str, Any]:
        """What a save writes of a state dict (checkpoint.stored_key: no tied head, not even a
        last stage's copy; the first stage writes the embedding)."""
        tied = self.model_cfg.tie_word_embeddings
        return {k: v for k, v in sd.items() if ckpt.stored_key(k, tied, False) is not None}

    def _state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Model and optimizer state under the model's own names (DTensors under a parallel
        layout, so DCP stores the global view)."""
        return get_state_dict(self.model, self.optimizer, options=StateDictOptions(**_SD_OPTIONS))

    def _writer_group(self):
        """A gloo process group of all ranks for the background writer (None in one process)."""
        if self.world_size == 1:
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(
                minutes=self.cfg.distributed_timeout_minutes))
        return self._group

    # ---------------------------------------------------------------- save
    def save(self, state: TrainState) -> Path:
        """Checkpoint `state`'s iteration; with --async-save the files are written in a
        background thread and the checkpoint is finished (marked complete, renamed, pointed to
        by the tracker) once every rank's writes are done: see `poll` and `wait`. A full or
        read-only disk ends in one CheckpointError, the temporary directory removed."""
        self._save_tmp: Optional[Path] = None
        try:
            return self._save(state)
        except (OSError, CheckpointException) as e:
            if self._save_tmp is not None:
                shutil.rmtree(self._save_tmp, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {self._save_tmp or self.cfg.save} "
                                  f"({ckpt.write_failure(e, self.cfg.save)}); its temporary files "
                                  f"were removed") from None

    def _save(self, state: TrainState) -> Path:
        self.wait()  # one save in flight at a time
        it = state.iteration
        tmp = self._save_tmp = ckpt.temporary_dir(self.cfg.save, it, self._nonce())
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        self._barrier()
        model_sd, optim_sd = self._state_dicts()
        save_rng(tmp, self.rank)
        tokenizer = None
        if self.cfg.tokenizer_model:
            # Every rank knows the recorded name; rank 0 copies the files.
            tokenizer = (ckpt.copy_tokenizer(self.cfg.tokenizer_model, tmp) if self.rank == 0
                         else ckpt.TOKENIZER_DIR)
        meta = {
            "iteration": it, "consumed_samples": state.consumed_samples,
            "model_config": self.model_cfg.to_dict(), "train_config": self.cfg.to_dict(),
            "tokenizer": tokenizer,
            "tokenizer_source": (str(Path(self.cfg.tokenizer_model).resolve())
                                 if self.cfg.tokenizer_model else None),
            "has_optimizer": True,
            "parallel_layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp,
                                "cp": self.layout.cp, "world_size": self.world_size},
        }
        sd = {"model": self._stored(model_sd), "optimizer": self._stored(optim_sd)}
        if self.cfg.async_save and self.world_size == 1:
            # DCP's writer thread says so outside any catch_warnings; one process is the intent.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            if self.cfg.async_save:
                # The state is copied to staging memory before this returns, so the next
                # optimizer steps cannot change what is written. The writer thread talks over
                # its own process group, never interleaving with the training collectives.
                future = dcp.async_save(sd, checkpoint_id=str(tmp), no_dist=self.world_size == 1,
                                        process_group=self._writer_group())
                self._pending = PendingSave(future, tmp, it, meta, time.perf_counter())
                if self.rank == 0:
                    print(f"saving checkpoint of iteration {it} in the background", flush=True)
                return ckpt.checkpoint_dir(self.cfg.save, it)
            dcp.save(sd, checkpoint_id=str(tmp))
        return self._complete(tmp, it, meta)

    def _complete(self, tmp: Path, it: int, meta: dict[str, Any]) -> Path:
        """Every rank has written its part: rank 0 writes meta.json, marks the directory
        complete and renames it into place."""
        self._barrier()
        final = ckpt.checkpoint_dir(self.cfg.save, it)
        if self.rank == 0:
            ckpt.write_meta(tmp, meta)
            final = ckpt.finalize(tmp, self.cfg.save, it)
            ckpt.prune(self.cfg.save, self.cfg.keep_last)
            print(f"saved checkpoint {final}", flush=True)
        self._barrier()
        return final

    def poll(self) -> Optional[Path]:
        """Finish a background save if its writes are done on every rank (else return None)."""
        return self._finish(wait=False)

    def wait(self) -> Optional[Path]:
        """Block until a background save is finished. A failed write raises CheckpointError."""
        return self._finish(wait=True)

    def _finish(self, wait: bool) -> Optional[Path]:
        pending = self._pending
        if pending is None:
            return None
        if not wait:
            done = torch.tensor([1 if pending.future.done() else 0], dtype=torch.int32,
                                device=self.device)
            if self.world_size > 1:
                dist.all_reduce(done, op=dist.ReduceOp.MIN)  # done only when done everywhere
            if not int(done.item()):
                return None
        self._pending = None
        try:
            pending.future.result()
        except (Exception, CheckpointException) as exc:
            shutil.rmtree(pending.tmp, ignore_errors=True)
            raise CheckpointError(f"background save of iteration {pending.iteration} to "
                                  f"{pending.tmp} failed ({ckpt.write_failure(exc, self.cfg.save)}); "
                                  "its temporary files were removed") from exc
        final = self._complete(pending.tmp, pending.iteration, pending.meta)
        if self.rank == 0:
            print(f"background save of iteration {pending.iteration} took "
                  f"{time.perf_counter() - pending.started:.2f}s", flush=True)
        return final

    # ---------------------------------------------------------------- load
    def load(self, load_dir: str) -> Optional[TrainState]:
        """Load weights (and, unless --finetune or a weights-only checkpoint, the optimizer,
        iteration and RNG) into this rank's model; returns the state to continue from, or None
        when only the weights were loaded (a fresh run from step 0)."""
        path = ckpt.find_checkpoint(load_dir, self.cfg.ckpt_step)
        meta = ckpt.read_meta(path)
        theirs = meta["model_config"]
        for f in ckpt.ARCH_FIELDS:
            if theirs.get(f) != getattr(self.model_cfg, f):
                raise CheckpointError(f"{path}: checkpoint has {f}={theirs.get(f)!r} but this run has "
                                      f"{f}={getattr(self.model_cfg, f)!r}")
        model_sd, optim_sd = self._state_dicts()
        tied = self.model_cfg.tie_word_embeddings
        stored = lambda k: ckpt.stored_key(k, tied, self.holds_tied_copy)  # noqa: E731
        mkeys = {stored(k): k for k in model_sd if stored(k) is not None}
        okeys = {stored(k): k for k in optim_sd if stored(k) is not None}
        with_optimizer = meta.get("has_optimizer", False) and not self.cfg.finetune
        sd: dict[str, Any] = {"model": {s: model_sd[k] for s, k in mkeys.items()}}
        if with_optimizer:
            sd["optimizer"] = {s: optim_sd[k] for s, k in okeys.items()}
        load_dcp(sd, path)
        model_state = {mkeys[s]: v for s, v in sd["model"].items()}
        options = StateDictOptions(strict=False, **_SD_OPTIONS)
        if with_optimizer:
            optim_state = {okeys[s]: v for s, v in sd["optimizer"].items()}
            set_state_dict(self.model, self.optimizer, model_state_dict=model_state,
                           optim_state_dict=optim_state, options=options)
        else:
            set_model_state_dict(self.model, model_state, options=options)
        m = self.model
        if tied and not self.holds_tied_copy and m.embed_tokens is not None and m.lm_head is not None:
            m.lm_head.weight = m.embed_tokens.weight
        if self.rank == 0:
            print(f"loaded checkpoint {path} (iteration {meta['iteration']}"
                  f"{'' if with_optimizer else ', model only: fresh optimizer from step 0'})", flush=True)
        if not with_optimizer:
            return None
        load_rng(path, self.rank)
        return TrainState(meta["iteration"], meta["consumed_samples"])
