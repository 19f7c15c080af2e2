"""The training loop: global batches of packed samples, AdamW, warmup + cosine, checkpoints.

Under torchrun or srun with several processes the model is split by megatron_sc2.parallel
(TP x PP x DP from --tensor-model-parallel-size / --pipeline-model-parallel-size and the world
size); one process runs the plain model. Both compute the same step on the same samples.

One step consumes `global_batch_size` samples, in micro batches of `micro_batch_size`, with the
loss normalized by the number of loss tokens in the whole global batch (so any split into micro
batches and data-parallel ranks computes the same step). Samples are addressed by global index
`consumed_samples + k`, which makes a resumed run consume exactly what the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.api import CheckpointException

from megatron_sc2.config import ModelConfig, TrainConfig
from megatron_sc2.errors import CheckpointError, ConfigError, UserError
from megatron_sc2.model import StarCoder2
from megatron_sc2.training import checkpoint as ckpt
from megatron_sc2.training.sinks import build_sinks
from megatron_sc2.training.optimizer import build_optimizer, learning_rate
from megatron_sc2.training.signals import StopRequests
from megatron_sc2.training import flops as flops_mod

# Fields of ModelConfig that must agree between a checkpoint and the run that loads it: the
# shapes. rope_theta, max_position_embeddings and sliding_window are left out on purpose: the
# 16k stage resumes a 4k checkpoint with the rotary base raised tenfold.
_ARCH_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                "num_query_groups", "tie_word_embeddings", "use_bias")


# Models up to this size are built whole on every rank (same weights as one process); larger
# ones are initialized shard by shard (megatron_sc2/parallel/init.py).
FULL_BUILD_MAX_PARAMS = 1_000_000_000


class TrainingError(UserError):
    """The run cannot go on (a NaN loss under --nan-policy stop, ...)."""


@dataclass
class PendingSave:
    """A checkpoint being written in the background (--async-save)."""

    future: Any  # concurrent.futures.Future from torch.distributed.checkpoint.async_save
    tmp: Path
    iteration: int
    meta: dict[str, Any]
    started: float


@dataclass
class TrainState:
    iteration: int = 0          # completed optimizer steps
    consumed_samples: int = 0   # global samples consumed by those steps


def masked_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                             loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the cross-entropy, weighted by the loss mask (computed in fp32)."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         reduction="none")
    return (ce * loss_mask.reshape(-1).float()).sum()


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        try:
            dev = torch.device(cfg.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"--device {cfg.device!r} is not a device name (cpu, cuda, cuda:N)") from None
        if dev.type == "cuda":
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if n == 0 or (dev.index is not None and dev.index >= n):
                raise ConfigError(f"--device {cfg.device}: this machine has {n} CUDA device(s)")
        elif dev.type != "cpu":
            raise ConfigError(f"--device {cfg.device}: only cpu and cuda devices are supported")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """One training run: the plain model in one process, or this rank's share of a TP x PP x DP
    layout (megatron_sc2.parallel) under torchrun/srun; the same samples and losses either way."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = pick_device(cfg)
        self.dp_rank, self.dp_size = 0, 1
        self.rank, self.world_size = 0, 1
        self.pm = None  # megatron_sc2.parallel.engine.ParallelModel under several processes
        self._pending_save: Optional[PendingSave] = None
        self.save_stalls: list[float] = []  # seconds each periodic save held up training
        self._ckpt_group = None
        self._init_distributed()
        self.tokenizer = self._load_tokenizer()
        self.model_cfg: ModelConfig = cfg.model_config(
            self.tokenizer.vocab_size if self.tokenizer is not None else None)
        from megatron_sc2.parallel.layout import layout_from_args

        self.layout = layout_from_args(cfg, self.world_size, self.model_cfg)
        self.dp_size = self.layout.dp
        self.global_batch_size = cfg.global_batch_size or cfg.micro_batch_size * self.dp_size
        per_step = cfg.micro_batch_size * self.dp_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size x data-parallel size ({cfg.micro_batch_size} x {self.dp_size})")
        self.num_micro_batches = self.global_batch_size // per_step
        self.log_dir = cfg.log_dir or cfg.save
        self.eod = self.tokenizer.eod if self.tokenizer is not None else self.model_cfg.eos_token_id

        torch.manual_seed(cfg.seed)
        if self.world_size > 1:
            self._build_parallel_model()
        else:
            self.model = StarCoder2(self.model_cfg).to(self.device)
            if cfg.compile:
                from megatron_sc2.parallel.wrappers import compile_blocks

                compile_blocks(self.model.layers.values())
        self.optimizer = build_optimizer([self.model], cfg)
        self.state = TrainState()
        self.train_ds, self.valid_ds, _ = self._build_datasets()
        if cfg.load and (cfg.ckpt_step is not None or ckpt.has_checkpoint(cfg.load)):
            self.load(cfg.load)
        elif cfg.load and not (cfg.save and Path(cfg.save).resolve() == Path(cfg.load).resolve()):
            # --load naming a directory with nothing finished in it is an error, unless it is
            # also the --save directory (a first run that will auto-resume after a requeue).
            ckpt.find_checkpoint(cfg.load)
        # metrics.jsonl, TensorBoard, W&B (rank 0 only; megatron_sc2/training/sinks.py)
        self.metrics = build_sinks(cfg, self.log_dir, self.rank, self.state.iteration)
        self.flops_per_step = flops_mod.train_flops_per_step(self.model_cfg, cfg.seq_length,
                                                             self.global_batch_size)
        self.peak_flops, self.peak_source = flops_mod.device_peak_flops(self.device)
        self.start_time = time.time()
        self.stop_requests = StopRequests.from_config(cfg, self.start_time)  # exit signal, SIGTERM

    # ----------------------------------------------------------------------------------- set-up
    def _init_distributed(self) -> None:
        """Join the job described by torchrun's or slurm's variables (one process: nothing)."""
        from megatron_sc2.parallel.env import detect

        env = detect()
        if not env.distributed:
            return
        import datetime

        import torch.distributed as dist

        env.export()
        if self.device.type == "cuda":
            self.device = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo",
                timeout=datetime.timedelta(minutes=self.cfg.distributed_timeout_minutes))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def _build_parallel_model(self) -> None:
        """Every rank builds the full model from the same seed (so any layout starts from the
        single-process weights), then keeps and shards its own part."""
        from megatron_sc2.parallel.engine import ParallelModel, build_mesh

        self.mesh = build_mesh(self.layout, self.device.type)
        self.dp_rank = self.mesh["dp"].get_local_rank()
        if self.model_cfg.num_params() <= FULL_BUILD_MAX_PARAMS:
            full = StarCoder2(self.model_cfg)
            seed = None
        else:
            # Too big to build whole on every rank: build on meta, shard, then allocate and
            # initialize only this rank's shards.
            with torch.device("meta"):
                full = StarCoder2(self.model_cfg)
            seed = self.cfg.seed
        self.pm = ParallelModel.build(self.model_cfg, self.layout, self.mesh, model=full,
                                      device=self.device, init_seed=seed,
                                      bf16=self.cfg.bf16, compile=self.cfg.compile)
        self.model = self.pm.rank_model
        if self.rank == 0:
            print(f"parallel layout {self.layout.describe()} on {self.world_size} ranks, "
                  f"{self.layout.num_microbatches} micro-batches per step", flush=True)

    def _dp_sum(self, value: float) -> float:
        if self.pm is None or self.dp_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.mesh["dp"].get_group())
        return float(t)

    def _load_tokenizer(self):
        if not self.cfg.tokenizer_model:
            if not self.cfg.mock_data:
                raise ConfigError("--tokenizer-model is required (or use --mock-data)")
            return None
        from megatron_sc2.data.tokenizer import load_tokenizer

        return load_tokenizer(self.cfg.tokenizer_model)

    def _num_samples(self) -> tuple[int, int, int]:
        cfg, gbs = self.cfg, self.global_batch_size
        train = cfg.train_iters * gbs
        evals = (cfg.train_iters // cfg.eval_interval + 1) if cfg.eval_interval > 0 else 0
        valid = evals * cfg.eval_iters * gbs
        test = cfg.eval_iters * gbs
        return train, valid, test

    def _build_datasets(self):
        if self.cfg.mock_data:
            from megatron_sc2.data.mock_data import MockDataset

            ds = MockDataset(self.model_cfg.vocab_size, self.cfg.seq_length, self.cfg.seed)
            return ds, MockDataset(self.model_cfg.vocab_size, self.cfg.seq_length, self.cfg.seed + 1), None
        if not (self.cfg.data_path or self.cfg.train_data_path):
            raise ConfigError("--data-path is required (or use --mock-data)")
        from megatron_sc2.data import build_train_valid_test_datasets

        return build_train_valid_test_datasets(self.cfg, self.tokenizer, self._num_samples())

    # ------------------------------------------------------------------------------------ steps
    def _micro_batch(self, dataset, first_sample: int, micro: int) -> dict[str, torch.Tensor]:
        """Micro batch `micro` of the global batch starting at `first_sample`, for this rank:
        Megatron's order (each micro batch is mbs x dp consecutive samples, split by rank)."""
        mbs = self.cfg.micro_batch_size
        start = first_sample + micro * mbs * self.dp_size + self.dp_rank * mbs
        samples = np.stack([np.asarray(dataset[i], dtype=np.int64) for i in range(start, start + mbs)])
        from megatron_sc2.data.batch import get_batch

        batch = get_batch(torch.from_numpy(samples), self.eod, self.cfg.reset_position_ids,
                          self.cfg.reset_attention_mask, self.cfg.eod_mask_loss)
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def _forward_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            logits = self.model(batch["tokens"], position_ids=batch.get("position_ids"),
                                document_ids=batch.get("document_ids"))
        return masked_cross_entropy_sum(logits, batch["labels"], batch["loss_mask"])

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over one global batch. Returns the step's loss and grad norm."""
        cfg = self.cfg
        lr = learning_rate(self.state.iteration, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self._micro_batch(self.train_ds, self.state.consumed_samples, m)
                   for m in range(self.num_micro_batches)]
        total_tokens = self._dp_sum(sum(float(b["loss_mask"].sum()) for b in batches))
        total_tokens = max(total_tokens, 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        if self.pm is not None:
            loss_sum, grad_norm = self._parallel_forward_backward(batches, total_tokens)
        else:
            loss_sum = 0.0
            for batch in batches:
                loss = self._forward_loss_sum(batch) / total_tokens
                loss.backward()
                loss_sum += float(loss.detach())
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if cfg.clip_grad > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
            else:
                grad_norm = float(torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        skipped = False
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            step = self.state.iteration + 1
            if cfg.nan_policy == "stop":
                raise TrainingError(f"step {step}: loss {loss_sum} / grad norm {grad_norm} is not finite; stopping "
                                    f"(use --nan-policy skip to skip such steps)")
            print(f"step {step}: loss {loss_sum} / grad norm {grad_norm} is not finite; step skipped", flush=True)
            self.optimizer.zero_grad(set_to_none=True)
            skipped = True
        else:
            self.optimizer.step()
        self.state.iteration += 1
        self.state.consumed_samples += self.global_batch_size
        return {"loss": loss_sum, "grad_norm": grad_norm, "lr": lr, "skipped": skipped}

    def _parallel_forward_backward(self, batches, total_tokens: float) -> tuple[float, float]:
        cfg = self.cfg
        cat = {k: torch.cat([b[k] for b in batches]) for k in ("tokens", "labels", "loss_mask")}
        pos = torch.cat([b["position_ids"] for b in batches]) if cfg.reset_position_ids else None
        docs = (torch.cat([b["document_ids"] for b in batches])
                if cfg.reset_attention_mask and batches[0].get("document_ids") is not None else None)
        with self._autocast():
            loss = self.pm.forward_backward(cat["tokens"], cat["labels"], cat["loss_mask"],
                                            total_tokens, pos, docs)
        if cfg.clip_grad > 0:
            grad_norm = self.pm.clip_grad_norm_(cfg.clip_grad)
        else:
            grad_norm = self.pm.grad_norm()
        return float(loss), float(grad_norm)

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.valid_ds is None or self.cfg.eval_iters <= 0:
            return None
        if self.pm is not None:
            return self._parallel_evaluate()
        self.model.eval()
        total, tokens = 0.0, 0.0
        for it in range(self.cfg.eval_iters):
            first = it * self.global_batch_size
            for m in range(self.num_micro_batches):
                batch = self._micro_batch(self.valid_ds, first, m)
                total += float(self._forward_loss_sum(batch))
                tokens += float(batch["loss_mask"].sum())
        self.model.train()
        return total / max(tokens, 1.0)

    def _parallel_evaluate(self) -> float:
        """Validation loss under a parallel layout: forward and loss only, no gradients kept."""
        total, tokens = 0.0, 0.0
        for it in range(self.cfg.eval_iters):
            first = it * self.global_batch_size
            batches = [self._micro_batch(self.valid_ds, first, m) for m in range(self.num_micro_batches)]
            n = self._dp_sum(sum(float(b["loss_mask"].sum()) for b in batches))
            cat = {k: torch.cat([b[k] for b in batches]) for k in ("tokens", "labels", "loss_mask")}
            pos = torch.cat([b["position_ids"] for b in batches]) if self.cfg.reset_position_ids else None
            docs = (torch.cat([b["document_ids"] for b in batches])
                    if self.cfg.reset_attention_mask and batches[0].get("document_ids") is not None else None)
            with self._autocast():
                loss = self.pm.forward_backward(cat["tokens"], cat["labels"], cat["loss_mask"],
                                                max(n, 1.0), pos, docs, backward=False)
            total += float(loss) * n
            tokens += n
        return total / max(tokens, 1.0)

    def _step_metrics(self, dt: float) -> dict[str, Any]:
        """Throughput and efficiency of one step: TFLOP/s per device, MFU, peak memory."""
        flops_per_device = self.flops_per_step / dt / self.world_size
        peak = flops_mod.peak_memory_bytes(self.device)
        out: dict[str, Any] = {"tflops_per_device": flops_per_device / 1e12,
                               "mfu": flops_per_device / self.peak_flops if self.peak_flops else None,
                               "peak_flops_source": self.peak_source}
        if self.world_size > 1:
            import torch.distributed as dist

            peaks = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
            peaks[self.rank] = peak
            dist.all_reduce(peaks)
            out["peak_memory_bytes_per_rank"] = [int(p) for p in peaks.tolist()]
            out["peak_memory_bytes"] = int(peaks.max())
        else:
            out["peak_memory_bytes"] = peak
        return out

    # ------------------------------------------------------------------------------------- loop
    def train(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        records = []
        self.model.train()
        tokens_per_step = self.global_batch_size * cfg.seq_length
        start_iteration = self.state.iteration
        while self.state.iteration < cfg.train_iters:
            t0 = time.perf_counter()
            out = self.train_step()
            dt = time.perf_counter() - t0
            it = self.state.iteration
            record = {"step": it, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                      "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
                      "consumed_samples": self.state.consumed_samples, "skipped": out["skipped"]}
            record.update(self._step_metrics(dt))
            if cfg.eval_interval > 0 and it % cfg.eval_interval == 0:
                record["valid_loss"] = self.evaluate()
            # --eval-code-interval: HumanEval pass@1 on the full model; leaves RNG and model as found
            if cfg.eval_code_interval > 0 and it % cfg.eval_code_interval == 0:
                from megatron_sc2.eval.during_training import code_eval_during_training

                record.update(code_eval_during_training(self.model, self.tokenizer, cfg, self.model_cfg,
                                                        self.world_size, self.rank))
            if it % cfg.log_interval == 0 or it == cfg.train_iters:
                self.metrics.write(record)
                if self.rank == 0:
                    print(f"step {it:>6}/{cfg.train_iters} | loss {out['loss']:.4f} | lr {out['lr']:.3e} | "
                          f"grad norm {out['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s", flush=True)
            records.append(record)
            saved = bool(cfg.save) and cfg.save_interval > 0 and it % cfg.save_interval == 0 \
                and it != cfg.train_iters
            if saved:
                t_save = time.perf_counter()
                self.save()
                self.save_stalls.append(time.perf_counter() - t_save)  # training stopped this long
            else:
                self.finish_pending_save(wait=False)
            reason = self._exit_reason(it)
            if reason:
                if cfg.save and not saved:  # a stop right after a periodic save: not twice
                    self.save()
                self.finish_pending_save(wait=True)
                if self.rank == 0:
                    print(f"stopping after step {it}: {reason}", flush=True)
                self.stop_requests.after_save(self.rank, resumable=bool(cfg.save) and it < cfg.train_iters)
                return records
        if cfg.save and self.state.iteration > start_iteration:  # a finished run resumed: nothing new
            self.save()
        self.finish_pending_save(wait=True)
        return records

    def _exit_reason(self, it: int) -> Optional[str]:
        cfg = self.cfg
        if cfg.exit_interval > 0 and it % cfg.exit_interval == 0 and it != cfg.train_iters:
            return f"--exit-interval {cfg.exit_interval}"
        stop = self.stop_requests.poll(self.device)  # signals and --exit-duration-in-mins, all ranks agree
        return stop.reason if stop else None

    # ------------------------------------------------------------------------------ checkpoints
    _SD_OPTIONS = dict(flatten_optimizer_state_dict=True)

    def _tied_copy(self) -> bool:
        """This rank is a last pipeline stage holding its own copy of the tied embedding."""
        return self.pm is not None and self.pm.holds_tied_copy

    def _state_dicts(self):
        """Model and optimizer state under the model's own names (DTensors under a parallel
        layout, so DCP stores the global view). Optimizer state is flattened per parameter
        (`state.<fqn>.exp_avg`, `param_groups.<fqn>.lr`) so ranks holding different
        parameters never write the same key. The tied lm_head is not stored."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(**self._SD_OPTIONS))
        if self.model_cfg.tie_word_embeddings:
            model_sd.pop("lm_head.weight", None)
            for k in [k for k in optim_sd if ".lm_head.weight" in k]:
                optim_sd.pop(k)
        return model_sd, optim_sd

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _nonce(self) -> str:
        """Rank 0's pid, agreed by every rank (they all write into the same temporary dir)."""
        if self.world_size == 1:
            return str(os.getpid())
        import torch.distributed as dist

        box = [os.getpid()]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])

    def save(self) -> Path:
        """Checkpoint the current iteration; with --async-save the files are written in a
        background thread and the checkpoint is finished (marked complete, renamed, pointed to by
        the tracker) once every rank's writes are done: see `finish_pending_save`. A full or
        read-only disk ends in one CheckpointError, the temporary directory removed."""
        self._save_tmp: Optional[Path] = None
        try:
            return self._save()
        except (OSError, CheckpointException) as e:
            if self._save_tmp is not None:
                shutil.rmtree(self._save_tmp, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {self._save_tmp or self.cfg.save} "
                                  f"({ckpt.write_failure(e, self.cfg.save)}); its temporary files were removed") from None

    def _save(self) -> Path:
        import torch.distributed.checkpoint as dcp

        self.finish_pending_save(wait=True)  # one save in flight at a time
        it = self.state.iteration
        tmp = self._save_tmp = ckpt.temporary_dir(self.cfg.save, it, self._nonce())
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        self._barrier()
        model_sd, optim_sd = self._state_dicts()
        ckpt.save_rng_state(tmp / "rng" / f"rank_{self.rank}.pt")
        meta = {
            "iteration": it, "consumed_samples": self.state.consumed_samples,
            "model_config": self.model_cfg.to_dict(), "train_config": self.cfg.to_dict(),
            "tokenizer": str(Path(self.cfg.tokenizer_model).resolve()) if self.cfg.tokenizer_model else None,
            "has_optimizer": True,
            "parallel_layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp,
                                "world_size": self.world_size},
        }
        state = {"model": model_sd, "optimizer": optim_sd}
        if self.cfg.async_save and self.world_size == 1:
            # DCP's writer thread says so outside any catch_warnings; one process is the intent.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            if self.cfg.async_save:
                # The state is copied to staging memory before this returns, so the next
                # optimizer steps cannot change what is written. The writer thread talks over
                # its own process group, never interleaving with the training collectives.
                future = dcp.async_save(state, checkpoint_id=str(tmp), no_dist=self.world_size == 1,
                                        process_group=self._checkpoint_group())
                self._pending_save = PendingSave(future, tmp, it, meta, time.perf_counter())
                if self.rank == 0:
                    print(f"saving checkpoint of iteration {it} in the background", flush=True)
                return ckpt.checkpoint_dir(self.cfg.save, it)
            dcp.save(state, checkpoint_id=str(tmp))
        return self._complete_save(tmp, it, meta)

    def _complete_save(self, tmp: Path, it: int, meta: dict[str, Any]) -> Path:
        """Every rank has written its part: rank 0 writes meta.json, marks the directory complete
        and renames it into place."""
        self._barrier()
        final = ckpt.checkpoint_dir(self.cfg.save, it)
        if self.rank == 0:
            ckpt.write_meta(tmp, meta)
            final = ckpt.finalize(tmp, self.cfg.save, it)
            ckpt.prune(self.cfg.save, self.cfg.keep_last)
            print(f"saved checkpoint {final}", flush=True)
        self._barrier()
        return final

    def finish_pending_save(self, wait: bool) -> Optional[Path]:
        """Finish a background save whose writes are done on every rank (all ranks call this at
        the same point: after each step, and before another save or an exit). With wait=True,
        block until it is done. A failed background write raises CheckpointError here."""
        pending = self._pending_save
        if pending is None:
            return None
        if not wait:
            done = torch.tensor([1 if pending.future.done() else 0], dtype=torch.int32,
                                device=self.device)
            if self.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(done, op=dist.ReduceOp.MIN)  # done only when done everywhere
            if not int(done.item()):
                return None
        self._pending_save = None
        try:
            pending.future.result()
        except (Exception, CheckpointException) as exc:
            shutil.rmtree(pending.tmp, ignore_errors=True)
            raise CheckpointError(f"background save of iteration {pending.iteration} to "
                                  f"{pending.tmp} failed ({ckpt.write_failure(exc, self.cfg.save)}); "
                                  "its temporary files were removed") from exc
        final = self._complete_save(pending.tmp, pending.iteration, pending.meta)
        if self.rank == 0:
            print(f"background save of iteration {pending.iteration} took "
                  f"{time.perf_counter() - pending.started:.2f}s", flush=True)
        return final

    def _checkpoint_group(self):
        """A gloo process group of all ranks for the background writer (None in one process)."""
        if self.world_size == 1:
            return None
        if self._ckpt_group is None:
            import torch.distributed as dist

            import datetime

            self._ckpt_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(
                minutes=self.cfg.distributed_timeout_minutes))
        return self._ckpt_group

    def load(self, load_dir: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        path = ckpt.find_checkpoint(load_dir, self.cfg.ckpt_step)
        meta = ckpt.read_meta(path)
        theirs = meta["model_config"]
        for f in _ARCH_FIELDS:
            if theirs.get(f) != getattr(self.model_cfg, f):
                raise CheckpointError(f"{path}: checkpoint has {f}={theirs.get(f)!r} but this run has "
                                      f"{f}={getattr(self.model_cfg, f)!r}")
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(**self._SD_OPTIONS))
        tied = self.model_cfg.tie_word_embeddings
        copy = self._tied_copy()
        if tied and not copy:
            model_sd.pop("lm_head.weight", None)
            for k in [k for k in optim_sd if ".lm_head.weight" in k]:
                optim_sd.pop(k)

        def stored(key: str) -> str:
            # A last stage's copy of the tied embedding is stored as the embedding.
            return key.replace("lm_head.weight", "embed_tokens.weight") if copy else key

        load_optimizer = meta.get("has_optimizer", False) and not self.cfg.finetune
        state: dict[str, Any] = {"model": {stored(k): v for k, v in model_sd.items()}}
        if load_optimizer:
            state["optimizer"] = {stored(k): v for k, v in optim_sd.items()}
        ckpt.load_dcp(state, path)
        back = {stored(k): k for k in model_sd}
        model_state = {back[k]: v for k, v in state["model"].items()}
        options = StateDictOptions(strict=False, **self._SD_OPTIONS)
        if load_optimizer:
            oback = {stored(k): k for k in optim_sd}
            optim_state = {oback[k]: v for k, v in state["optimizer"].items()}
            set_state_dict(self.model, self.optimizer, model_state_dict=model_state,
                           optim_state_dict=optim_state, options=options)
        else:
            self._set_model_only(model_state, options)
        if tied and not copy and self.model.embed_tokens is not None and self.model.lm_head is not None:
            self.model.lm_head.weight = self.model.embed_tokens.weight
        if load_optimizer:
            self.state = TrainState(meta["iteration"], meta["consumed_samples"])
            rng_file = path / "rng" / f"rank_{self.rank}.pt"
            if rng_file.is_file():
                ckpt.load_rng_state(rng_file)
        if self.rank == 0:
            print(f"loaded checkpoint {path} (iteration {meta['iteration']}"
                  f"{'' if load_optimizer else ', model only: fresh optimizer from step 0'})", flush=True)

    def _set_model_only(self, model_sd, options) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, model_sd, options=options)


def train(cfg: TrainConfig) -> list[dict[str, Any]]:
    trainer = None
    try:
        trainer = Trainer(cfg)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.metrics.close()
        from megatron_sc2.parallel.env import shutdown_distributed

        shutdown_distributed()


def config_with(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(cfg, **changes).validate()
