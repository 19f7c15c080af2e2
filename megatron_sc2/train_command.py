"""`megatron-sc2 train --config FILE [--flag value ...]`: a training run built from the command line.

This sits above training and eval because it wires them together: the trainer is a loop that
knows nothing of evaluation, and the options served by rooms above it (`--eval-code-interval`:
eval's HumanEval pass@1) become step hooks here (training/hooks.py).
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

from megatron_sc2.config import TrainConfig, parse_train_args
from megatron_sc2.training.hooks import StepHook


def step_hooks(cfg: TrainConfig) -> list[StepHook]:
    """The hooks the options in `cfg` ask for."""
    hooks: list[StepHook] = []
    if cfg.eval_code_interval > 0:
        from megatron_sc2.eval.during_training import CodeEvalHook

        hooks.append(CodeEvalHook(cfg.eval_code_interval))
    return hooks


def build_trainer(cfg: TrainConfig):
    """A `Trainer` for `cfg` with the hooks its options ask for."""
    from megatron_sc2.training.trainer import Trainer

    return Trainer(cfg, step_hooks(cfg))


def train(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The whole run (training/trainer.py `train`) with the hooks its options ask for."""
    from megatron_sc2.training.trainer import train as train_loop

    return train_loop(cfg, step_hooks(cfg))


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_train_args(sys.argv[1:] if argv is None else argv)
    from megatron_sc2.training.signals import install_early

    startup = install_early(cfg)  # noqa: F841 - stop signals during start-up wait for step 1
    from megatron_sc2.parallel.failures import collective_failures

    with collective_failures():  # a dead or hung peer: one line naming this rank, exit 2
        train(cfg)
    return 0
