"""Where logged steps go: metrics.jsonl (always), TensorBoard (`--tensorboard-dir`) and Weights &
Biases (`--wandb-project`, optional package).

Every sink takes the same record the trainer already built for metrics.jsonl (Python numbers,
reduced on log steps only), so adding one adds no host synchronisation. Only rank 0 builds sinks.
Scalar names follow Megatron's TensorBoard tags where Megatron has one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Protocol

from megatron_sc2.config import TrainConfig
from megatron_sc2.errors import ConfigError
from megatron_sc2.training.metrics import MetricsLog

# record key -> scalar tag (Megatron's where it has one)
SCALARS: dict[str, str] = {
    "loss": "lm loss",
    "valid_loss": "lm loss validation",
    "lr": "learning-rate",
    "grad_norm": "grad-norm",
    "tokens_per_s": "tokens-per-second",
    "tflops_per_device": "throughput",  # TFLOP/s per device, as Megatron's `throughput`
    "mfu": "mfu",
    "peak_memory_bytes": "peak-memory-bytes",
    "consumed_samples": "consumed-samples",
    "step_time_s": "iteration-time",
}


CODE_EVAL_PREFIX = "code_pass@"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a record, under their scalar tags."""
    out = {}
    for key, tag in SCALARS.items():
        v = record.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[tag] = float(v)
    for key, v in record.items():  # code evaluation during training: code_pass@1/<task>
        if key.startswith(CODE_EVAL_PREFIX) and isinstance(v, (int, float)) and math.isfinite(v):
            out[key] = float(v)
    return out


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Scalars per step in TensorBoard event files (torch.utils.tensorboard). On resume, events
    after the resumed step are purged so the curves read as one run."""

    def __init__(self, log_dir: str | Path, resume_from_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(f"--tensorboard-dir needs the tensorboard package "
                              f"(pip install tensorboard): {exc}") from None
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(log_dir),
                                    purge_step=resume_from_step + 1 if resume_from_step else None)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # once per logged step: a crash loses nothing already logged

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Weights & Biases run; `WANDB_MODE=offline` (or `wandb offline`) is honoured by wandb
    itself. The package is optional: asking for it without it installed is a one-line error."""

    def __init__(self, cfg: TrainConfig, resume_from_step: int = 0):
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb-project needs the wandb package, which is not installed "
                              "(pip install wandb, or drop --wandb-project)") from None
        save_dir = cfg.wandb_save_dir or cfg.log_dir or cfg.save
        if save_dir:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_exp_name, dir=save_dir,
                              config=cfg.to_dict(), resume="allow" if resume_from_step else None)

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class MetricSinks:
    """Fan-out with MetricsLog's interface: the trainer writes one record, every sink gets it."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    @property
    def path(self) -> Optional[Path]:  # metrics.jsonl, as MetricsLog.path
        return next((s.path for s in self.sinks if isinstance(s, MetricsLog)), None)

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()


def build_sinks(cfg: TrainConfig, log_dir: Optional[str], rank: int,
                resume_from_step: int = 0) -> MetricSinks:
    """metrics.jsonl in `log_dir`, plus TensorBoard and W&B when asked for; nothing on ranks
    other than 0."""
    if rank != 0:
        return MetricSinks([])
    sinks: list[Sink] = [MetricsLog(log_dir, resume_from_step=resume_from_step)]
    if cfg.tensorboard_dir:
        sinks.append(TensorBoardSink(cfg.tensorboard_dir, resume_from_step))
    if cfg.wandb_project:
        sinks.append(WandbSink(cfg, resume_from_step))
    return MetricSinks(sinks)
