"""The training loop: batches in, metrics out.

Set-up joins the job (parallel/env.py), builds this rank's share of the model through the
engine (parallel/engine.py: the same step code for one process and for any TP x PP x DP
layout), the optimizer, the datasets and their loader (data/loader.py), and the checkpointer
(training/checkpointer.py). Each step the loader hands over this rank's share of the next
global batch (built in the background meanwhile), the engine computes loss, gradients, grad
norm and clipping, and the optimizer steps.

One step consumes `global_batch_size` samples, in micro batches of `micro_batch_size`, with the
loss normalized by the number of loss tokens in the whole global batch (so any split into micro
batches and data-parallel ranks computes the same step). Samples are addressed by global index
`consumed_samples + k`, which makes a resumed run consume exactly what the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from megatron_sc2.config import ModelConfig, TrainConfig
from megatron_sc2.data.loader import BatchLoader, BatchPlan
from megatron_sc2.errors import ConfigError, UserError
from megatron_sc2.model import StarCoder2
from megatron_sc2.parallel.engine import Engine, build_mesh
from megatron_sc2.parallel.env import init_distributed
from megatron_sc2.parallel.layout import layout_from_args
from megatron_sc2.training import checkpoint as ckpt
from megatron_sc2.training import flops as flops_mod
from megatron_sc2.training.checkpoint import TrainState
from megatron_sc2.training.checkpointer import Checkpointer
from megatron_sc2.training.hooks import StepHook, TrainerView, check_hooks
from megatron_sc2.training.optimizer import build_optimizer, learning_rate
from megatron_sc2.training.sinks import build_sinks
from megatron_sc2.training.signals import StopRequests

# Models up to this size are built whole on every rank (same weights as one process); larger
# ones are initialized shard by shard (megatron_sc2/parallel/init.py).
FULL_BUILD_MAX_PARAMS = 1_000_000_000


class TrainingError(UserError):
    """The run cannot go on (a NaN loss under --nan-policy stop, ...)."""


def requested_device(cfg: TrainConfig) -> Optional[torch.device]:
    """--device as a torch.device (None: CUDA if there is one, else CPU)."""
    if not cfg.device:
        return None
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


class Trainer:
    """One training run: this rank's share of a TP x PP x DP layout (1 x 1 x 1 in one process)
    under torchrun/srun or alone; the same samples and losses either way. `hooks` run between
    steps (training/hooks.py: `megatron-sc2 train` registers eval's code evaluation there)."""

    def __init__(self, cfg: TrainConfig, hooks: Sequence[StepHook] = ()):
        import torch.distributed as dist

        check_hooks(cfg, hooks)
        self.cfg = cfg
        self.hooks = list(hooks)
        asked = requested_device(cfg)
        self.device = init_distributed(cfg.distributed_timeout_minutes,
                                       asked.type if asked is not None else None)
        if asked is not None and not dist.is_initialized():
            self.device = asked  # one process: exactly the device asked for
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.tokenizer = self._load_tokenizer()
        self.model_cfg: ModelConfig = cfg.model_config(
            self.tokenizer.vocab_size if self.tokenizer is not None else None)
        self.layout = layout_from_args(cfg, self.world_size, self.model_cfg)
        self.global_batch_size = self.layout.global_batch_size
        self.log_dir = cfg.log_dir or cfg.save
        self.eod = self.tokenizer.eod if self.tokenizer is not None else self.model_cfg.eos_token_id

        torch.manual_seed(cfg.seed)
        self.engine = self._build_engine()
        self.model = self.engine.rank_model
        self.optimizer = build_optimizer([self.model], cfg)
        self.checkpointer = Checkpointer(cfg, self.model_cfg, self.model, self.optimizer, self.layout,
                                         self.rank, self.world_size, self.device,
                                         holds_tied_copy=self.engine.holds_tied_copy)
        self.save_stalls: list[float] = []  # seconds each periodic save held up training
        self.state = TrainState()
        train_ds, valid_ds = self._build_datasets()
        plan = BatchPlan(cfg.micro_batch_size, self.layout.num_microbatches, self.engine.dp_rank,
                         self.layout.dp, self.eod, cfg.reset_position_ids,
                         cfg.reset_attention_mask, cfg.eod_mask_loss)
        self.train_loader = BatchLoader(train_ds, plan, self.device, cfg.num_workers)
        self.valid_loader = (BatchLoader(valid_ds, plan, self.device, cfg.num_workers)
                             if valid_ds is not None else None)
        if cfg.load and (cfg.ckpt_step is not None or ckpt.has_checkpoint(cfg.load)):
            self.state = self.checkpointer.load(cfg.load) or TrainState()
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
    def _build_engine(self) -> Engine:
        """Every rank builds the full model from the same seed (so any layout starts from the
        single-process weights), then keeps and shards its own part. Too big for that (only
        under several processes): built on meta, each rank initializes its own shards."""
        mesh = build_mesh(self.layout, self.device.type)
        seed = None
        if self.world_size > 1 and self.model_cfg.num_params() > FULL_BUILD_MAX_PARAMS:
            with torch.device("meta"):
                full = StarCoder2(self.model_cfg)
            seed = self.cfg.seed
        else:
            full = StarCoder2(self.model_cfg)
        engine = Engine.build(self.model_cfg, self.layout, mesh, model=full, device=self.device,
                              init_seed=seed, bf16=self.cfg.bf16, compile=self.cfg.compile)
        if self.world_size > 1 and self.rank == 0:
            print(f"parallel layout {self.layout.describe()} on {self.world_size} ranks, "
                  f"{self.layout.num_microbatches} micro-batches per step", flush=True)
            if self.layout.cp > 1:
                from megatron_sc2.parallel.context_parallel import exchange_description

                print(f"context parallel: {exchange_description(self.model_cfg.sliding_window)}",
                      flush=True)
        return engine

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

            v, s, seed = self.model_cfg.vocab_size, self.cfg.seq_length, self.cfg.seed
            return MockDataset(v, s, seed, eod=self.eod), MockDataset(v, s, seed + 1, eod=self.eod)
        if not (self.cfg.data_path or self.cfg.train_data_path):
            raise ConfigError("--data-path is required (or use --mock-data)")
        from megatron_sc2.data import build_train_valid_test_datasets

        train, valid, _ = build_train_valid_test_datasets(self.cfg, self.tokenizer, self._num_samples())
        return train, valid

    # ------------------------------------------------------------------------------------ steps
    def train_step(self, batch: Optional[dict[str, Optional[torch.Tensor]]] = None) -> dict[str, Any]:
        """One optimizer step over this rank's share of one global batch (default: the next
        one of the training set)."""
        cfg = self.cfg
        if batch is None:
            batch = self.train_loader.get(self.state.consumed_samples)
        lr = learning_rate(self.state.iteration, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_t, norm_t = self.engine.train_step(batch, cfg.clip_grad)
        loss, grad_norm = (float(x) for x in torch.stack([loss_t, norm_t]).tolist())  # one sync
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            step = self.state.iteration + 1
            if cfg.nan_policy == "stop":
                raise TrainingError(f"step {step}: loss {loss} / grad norm {grad_norm} is not finite; "
                                    f"stopping (use --nan-policy skip to skip such steps)")
            print(f"step {step}: loss {loss} / grad norm {grad_norm} is not finite; step skipped", flush=True)
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        self.state.iteration += 1
        self.state.consumed_samples += self.global_batch_size
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped": skipped}

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean token loss over --eval-iters global batches of the validation set."""
        if self.valid_loader is None or self.cfg.eval_iters <= 0:
            return None
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        gbs, n = self.global_batch_size, self.cfg.eval_iters
        for it in range(n):
            batch = self.valid_loader.get(it * gbs, (it + 1) * gbs if it + 1 < n else None)
            loss, count = self.engine.evaluate(batch)
            total += loss.double() * count.double()
            tokens += count.double()
        return float(total / tokens)

    def _step_metrics(self, dt: float, gather: bool) -> dict[str, Any]:
        """Throughput and efficiency of one step: TFLOP/s per device, MFU, peak memory (every
        rank's, gathered only when `gather`: on log steps)."""
        flops_per_device = self.flops_per_step / dt / self.world_size
        peak = flops_mod.peak_memory_bytes(self.device)
        out: dict[str, Any] = {"tflops_per_device": flops_per_device / 1e12,
                               "mfu": flops_per_device / self.peak_flops if self.peak_flops else None,
                               "peak_flops_source": self.peak_source, "peak_memory_bytes": peak}
        if self.world_size > 1 and gather:
            import torch.distributed as dist

            peaks = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
            peaks[self.rank] = peak
            dist.all_reduce(peaks)
            out["peak_memory_bytes_per_rank"] = [int(p) for p in peaks.tolist()]
            out["peak_memory_bytes"] = int(peaks.max())
        return out

    # ------------------------------------------------------------------------------------- loop
    def train(self) -> list[dict[str, Any]]:
        try:
            return self._loop()
        finally:
            # A signal after the run (the rest of a demo, a test) must act as if we were never
            # there, not be recorded for a loop that no longer polls.
            self.stop_requests.uninstall()
            self.train_loader.close()
            if self.valid_loader is not None:
                self.valid_loader.close()

    def _loop(self) -> list[dict[str, Any]]:
        cfg, gbs = self.cfg, self.global_batch_size
        records = []
        self.model.train()
        tokens_per_step = gbs * cfg.seq_length
        start_iteration = self.state.iteration
        while self.state.iteration < cfg.train_iters:
            t0 = time.perf_counter()
            first = self.state.consumed_samples
            more = self.state.iteration + 1 < cfg.train_iters
            out = self.train_step(self.train_loader.get(first, first + gbs if more else None))
            dt = time.perf_counter() - t0
            it = self.state.iteration
            log = it % cfg.log_interval == 0 or it == cfg.train_iters
            record = {"step": it, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                      "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
                      "consumed_samples": self.state.consumed_samples, "skipped": out["skipped"]}
            record.update(self._step_metrics(dt, gather=log))
            if cfg.eval_interval > 0 and it % cfg.eval_interval == 0:
                record["valid_loss"] = self.evaluate()
            due = [hook for hook in self.hooks if it % hook.every == 0]
            for hook in due:  # e.g. --eval-code-interval; each leaves RNG and model as found
                record.update(hook(it, self._view()))
            if log or "valid_loss" in record or due:
                self.metrics.write(record)  # evaluation results are never left unlogged
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
                self.checkpointer.poll()
            reason = self._exit_reason(it)
            if reason:
                if cfg.save and not saved:  # a stop right after a periodic save: not twice
                    self.save()
                self.checkpointer.wait()
                if self.rank == 0:
                    print(f"stopping after step {it}: {reason}", flush=True)
                self.stop_requests.after_save(self.rank, resumable=bool(cfg.save) and it < cfg.train_iters)
                return records
        if cfg.save and self.state.iteration > start_iteration:  # a finished run resumed: nothing new
            self.save()
        self.checkpointer.wait()
        return records

    def _exit_reason(self, it: int) -> Optional[str]:
        cfg = self.cfg
        if cfg.exit_interval > 0 and it % cfg.exit_interval == 0 and it != cfg.train_iters:
            return f"--exit-interval {cfg.exit_interval}"
        stop = self.stop_requests.poll(self.device)  # signals and --exit-duration-in-mins, all ranks agree
        return stop.reason if stop else None

    def save(self) -> Path:
        return self.checkpointer.save(self.state)

    def _view(self) -> TrainerView:
        return TrainerView(self.model, self.tokenizer, self.cfg, self.model_cfg, self.world_size, self.rank)


def train(cfg: TrainConfig, hooks: Sequence[StepHook] = ()) -> list[dict[str, Any]]:
    trainer = None
    try:
        trainer = Trainer(cfg, hooks)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.metrics.close()
        from megatron_sc2.parallel.env import shutdown_distributed

        shutdown_distributed()


def config_with(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(cfg, **changes).validate()
