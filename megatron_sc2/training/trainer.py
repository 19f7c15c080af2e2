"""The training loop: global batches of packed samples, AdamW, warmup + cosine, checkpoints.

One step consumes `global_batch_size` samples, in micro batches of `micro_batch_size`, with the
loss normalized by the number of loss tokens in the whole global batch (so any split into micro
batches and data-parallel ranks computes the same step). Samples are addressed by global index
`consumed_samples + k`, which makes a resumed run consume exactly what the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from megatron_sc2.config import ModelConfig, TrainConfig
from megatron_sc2.errors import CheckpointError, ConfigError, UserError
from megatron_sc2.model import StarCoder2
from megatron_sc2.training import checkpoint as ckpt
from megatron_sc2.training.metrics import MetricsLog
from megatron_sc2.training.optimizer import build_optimizer, learning_rate
from megatron_sc2.training.signals import StopRequests

# Fields of ModelConfig that must agree between a checkpoint and the run that loads it.
_ARCH_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                "num_query_groups", "tie_word_embeddings", "use_bias")


class TrainingError(UserError):
    """The run cannot go on (a NaN loss under --nan-policy stop, ...)."""


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
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """Single-process trainer (data-parallel slicing and checkpoint format already global)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = pick_device(cfg)
        self.dp_rank, self.dp_size = 0, 1
        self.rank = 0
        self.tokenizer = self._load_tokenizer()
        self.model_cfg: ModelConfig = cfg.model_config(
            self.tokenizer.vocab_size if self.tokenizer is not None else None)
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
        self.model = StarCoder2(self.model_cfg).to(self.device)
        self.optimizer = build_optimizer([self.model], cfg)
        self.state = TrainState()
        self.train_ds, self.valid_ds, _ = self._build_datasets()
        if cfg.load and ckpt.has_checkpoint(cfg.load):
            self.load(cfg.load)
        elif cfg.load and not (cfg.save and Path(cfg.save).resolve() == Path(cfg.load).resolve()):
            # --load naming a directory with nothing finished in it is an error, unless it is
            # also the --save directory (a first run that will auto-resume after a requeue).
            ckpt.find_checkpoint(cfg.load)
        self.metrics = MetricsLog(self.log_dir, resume_from_step=self.state.iteration,
                                  enabled=self.rank == 0)
        self.start_time = time.time()
        self.stop_requests = StopRequests.from_config(cfg, self.start_time)  # exit signal, SIGTERM

    # ----------------------------------------------------------------------------------- set-up
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
            from megatron_sc2.training.mock_data import MockDataset

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
        total_tokens = sum(float(b["loss_mask"].sum()) for b in batches)
        total_tokens = max(total_tokens, 1.0)
        self.optimizer.zero_grad(set_to_none=True)
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

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        if self.valid_ds is None or self.cfg.eval_iters <= 0:
            return None
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

    # ------------------------------------------------------------------------------------- loop
    def train(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        records = []
        self.model.train()
        tokens_per_step = self.global_batch_size * cfg.seq_length
        while self.state.iteration < cfg.train_iters:
            t0 = time.perf_counter()
            out = self.train_step()
            dt = time.perf_counter() - t0
            it = self.state.iteration
            record = {"step": it, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                      "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
                      "consumed_samples": self.state.consumed_samples, "skipped": out["skipped"]}
            if cfg.eval_interval > 0 and it % cfg.eval_interval == 0:
                record["valid_loss"] = self.evaluate()
            if it % cfg.log_interval == 0 or it == cfg.train_iters:
                self.metrics.write(record)
                if self.rank == 0:
                    print(f"step {it:>6}/{cfg.train_iters} | loss {out['loss']:.4f} | lr {out['lr']:.3e} | "
                          f"grad norm {out['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s", flush=True)
            records.append(record)
            if cfg.save and cfg.save_interval > 0 and it % cfg.save_interval == 0 and it != cfg.train_iters:
                self.save()
            reason = self._exit_reason(it)
            if reason:
                if cfg.save:
                    self.save()
                print(f"stopping after step {it}: {reason}", flush=True)
                self.stop_requests.after_save(self.rank, resumable=bool(cfg.save) and it < cfg.train_iters)
                return records
        if cfg.save:
            self.save()
        return records

    def _exit_reason(self, it: int) -> Optional[str]:
        cfg = self.cfg
        if cfg.exit_interval > 0 and it % cfg.exit_interval == 0 and it != cfg.train_iters:
            return f"--exit-interval {cfg.exit_interval}"
        stop = self.stop_requests.poll(self.device)  # signals and --exit-duration-in-mins, all ranks agree
        return stop.reason if stop else None

    # ------------------------------------------------------------------------------ checkpoints
    def _state_dicts(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        if self.model_cfg.tie_word_embeddings:
            model_sd.pop("lm_head.weight", None)
        return model_sd, optim_sd

    def save(self) -> Path:
        import torch.distributed.checkpoint as dcp

        it = self.state.iteration
        tmp = ckpt.temporary_dir(self.cfg.save, it, str(os.getpid()))
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        model_sd, optim_sd = self._state_dicts()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
                   tmp / "rng" / f"rank_{self.rank}.pt")
        ckpt.write_meta(tmp, {
            "iteration": it, "consumed_samples": self.state.consumed_samples,
            "model_config": self.model_cfg.to_dict(), "train_config": self.cfg.to_dict(),
            "tokenizer": str(Path(self.cfg.tokenizer_model).resolve()) if self.cfg.tokenizer_model else None,
            "has_optimizer": True,
        })
        final = ckpt.finalize(tmp, self.cfg.save, it)
        ckpt.prune(self.cfg.save, self.cfg.keep_last)
        print(f"saved checkpoint {final}", flush=True)
        return final

    def load(self, load_dir: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        path = ckpt.find_checkpoint(load_dir)
        meta = ckpt.read_meta(path)
        theirs = meta["model_config"]
        for f in _ARCH_FIELDS:
            if theirs.get(f) != getattr(self.model_cfg, f):
                raise CheckpointError(f"{path}: checkpoint has {f}={theirs.get(f)!r} but this run has "
                                      f"{f}={getattr(self.model_cfg, f)!r}")
        model_sd, optim_sd = self._state_dicts()
        load_optimizer = meta.get("has_optimizer", False) and not self.cfg.finetune
        state: dict[str, Any] = {"model": model_sd}
        if load_optimizer:
            state["optimizer"] = optim_sd
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
        options = StateDictOptions(strict=False)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state.get("optimizer", {}), options=options) \
            if load_optimizer else self._set_model_only(state["model"], options)
        if self.model_cfg.tie_word_embeddings:
            self.model.lm_head.weight = self.model.embed_tokens.weight
        if load_optimizer:
            self.state = TrainState(meta["iteration"], meta["consumed_samples"])
            rng_file = path / "rng" / f"rank_{self.rank}.pt"
            if rng_file.is_file():
                rng = torch.load(rng_file, weights_only=False)
                torch.set_rng_state(rng["torch"])
                np.random.set_state(rng["numpy"])
        print(f"loaded checkpoint {path} (iteration {meta['iteration']}"
              f"{'' if load_optimizer else ', model only: fresh optimizer from step 0'})", flush=True)

    def _set_model_only(self, model_sd, options) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, model_sd, options=options)


def train(cfg: TrainConfig) -> list[dict[str, Any]]:
    return Trainer(cfg).train()


def config_with(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(cfg, **changes).validate()
