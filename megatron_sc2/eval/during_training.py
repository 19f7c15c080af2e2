"""`--eval-code-interval N`: HumanEval pass@1 of the model being trained, every N steps.

The trainer calls `code_eval_during_training` at one place in its loop and adds the returned
numbers to the step's metrics record (metrics.jsonl). Evaluation runs greedily, under no_grad,
on the process's own full model; every random number generator is saved before and restored
after, and the model's train/eval mode is put back, so training continues exactly as it would
have without the evaluation (a resumed run stays bit-exact).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from megatron_sc2.errors import ConfigError
from megatron_sc2.eval.tasks import parse_task_list


@dataclass
class _RNGState:
    torch_cpu: torch.Tensor
    torch_cuda: Optional[list]
    python: Any
    numpy: Any

    @classmethod
    def save(cls) -> "_RNGState":
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda, random.getstate(), np.random.get_state())

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        random.setstate(self.python)
        np.random.set_state(self.numpy)


def code_eval_during_training(model: torch.nn.Module, tokenizer, cfg, world_size: int) -> dict[str, float]:
    """pass@1 per task set (keys `code_pass@1/<task>`), on this process's full model.

    `cfg` is the TrainConfig (eval_code_* fields). Needs the training tokenizer (its FIM
    tokens for infilling tasks) and, for now, a single process: under TP/PP no rank holds the
    whole model."""
    from megatron_sc2.eval.run import EvalOptions, evaluate

    if world_size > 1:
        raise ConfigError("--eval-code-interval runs in single-process training only for now "
                          "(under TP/PP/DP no rank holds a full model copy); evaluate the saved "
                          "checkpoints with `megatron-sc2 eval --load` instead")
    if tokenizer is None:
        raise ConfigError("--eval-code-interval needs --tokenizer-model (prompts must be encoded)")
    opts = EvalOptions(tasks=parse_task_list(cfg.eval_code_tasks), n_samples=1, temperature=0.0,
                       max_new_tokens=cfg.eval_code_max_new_tokens, batch_size=8,
                       limit=cfg.eval_code_limit or None, ks=[1], workers=cfg.eval_code_workers,
                       progress=False)
    rng = _RNGState.save()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            results, _ = evaluate(model, tokenizer, opts)
    finally:
        model.train(was_training)
        rng.restore()
    return {f"code_pass@1/{name}": r["pass@k"]["pass@1"] for name, r in results.items()}
