"""Periodic work the training loop runs between steps without knowing what it is.

Rooms above training (eval's code evaluation, `--eval-code-interval`) hand the trainer hooks
instead of the trainer importing them: the loop calls each hook after every `every`-th step (after
the step's validation) with a read-only view of the run, and adds the returned numbers to that
step's metrics record, which is then always logged. A hook must leave the model, its train/eval
mode and every random number generator as it found them, so that a run with the hook trains
exactly as one without it (and a resumed run stays bit-exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from megatron_sc2.config import ModelConfig, TrainConfig
from megatron_sc2.errors import ConfigError


@dataclass(frozen=True)
class TrainerView:
    """What a hook may read of the run: this rank's model (its share under TP/PP/DP), the
    tokenizer (None with --mock-data and no --tokenizer-model), the configurations and the rank."""

    model: torch.nn.Module
    tokenizer: Any
    cfg: TrainConfig
    model_cfg: ModelConfig
    world_size: int
    rank: int


class StepHook(Protocol):
    """Runs after every `every`-th step; `flag` names the option that asked for it (for errors)."""

    every: int
    flag: str

    def __call__(self, step: int, view: TrainerView) -> dict[str, float]: ...


# Options whose work is done by a hook from a room above training: set without that hook, the
# trainer refuses to start rather than silently not doing it.
HOOK_FLAGS: dict[str, str] = {"eval_code_interval": "--eval-code-interval"}


def check_hooks(cfg: TrainConfig, hooks: Sequence[StepHook]) -> None:
    """Every hook runs at a positive interval, and every hook-backed option that is set has one."""
    for hook in hooks:
        if not (isinstance(hook.every, int) and hook.every > 0):
            raise ConfigError(f"{hook.flag}: a step hook must run every N >= 1 steps, got {hook.every!r}")
    given = {hook.flag for hook in hooks}
    for field, flag in HOOK_FLAGS.items():
        if getattr(cfg, field) > 0 and flag not in given:
            raise ConfigError(f"{flag} is set but this run has no hook for it: build the run with "
                              f"megatron_sc2.train_command.build_trainer (what `megatron-sc2 train` does)")

