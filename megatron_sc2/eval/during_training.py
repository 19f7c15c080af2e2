"""`--eval-code-interval N`: HumanEval pass@1 of the model being trained, every N steps.

`megatron-sc2 train` hands the trainer a `CodeEvalHook` (a step hook, training/hooks.py); the
loop calls it every N steps and adds the returned numbers to the step's metrics record
(metrics.jsonl). Evaluation runs greedily, under no_grad, on a full copy of the model (gathered
through a temporary checkpoint under TP/PP/DP); every random number generator is saved before
and restored after, and the model's train/eval mode is put back, so training continues exactly
as it would have without the evaluation (a resumed run stays bit-exact).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from megatron_sc2.errors import ConfigError, UserError
from megatron_sc2.eval.tasks import parse_task_list
from megatron_sc2.training.hooks import TrainerView


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


@dataclass(frozen=True)
class CodeEvalHook:
    """The step hook of `--eval-code-interval N`: `code_eval_during_training` every N steps."""

    every: int
    flag: str = "--eval-code-interval"

    def __call__(self, step: int, view: TrainerView) -> dict[str, float]:
        return code_eval_during_training(view.model, view.tokenizer, view.cfg, view.model_cfg,
                                         view.world_size, view.rank)


def code_eval_during_training(model: torch.nn.Module, tokenizer, cfg, model_cfg, world_size: int,
                              rank: int) -> dict[str, float]:
    """pass@1 per task set (keys `code_pass@1/<task>`), on a full copy of the model.

    `cfg` is the TrainConfig (eval_code_* fields), `model_cfg` the model's. In one process the
    training model itself is evaluated. Under several processes (TP/PP/DP) no rank holds the
    whole model, so every rank writes its part with torch.distributed.checkpoint into a
    temporary directory under --save (shared by all nodes, as checkpoints are), rank 0 loads the
    whole model from it by global names, evaluates, deletes it, and broadcasts the numbers."""
    from megatron_sc2.eval.run import EvalOptions, evaluate

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
            if world_size == 1:
                results, _ = evaluate(model, tokenizer, opts)
            else:
                results = _gathered_eval(model, tokenizer, cfg, model_cfg, rank, opts)
    finally:
        model.train(was_training)
        rng.restore()
    return {f"code_pass@1/{name}": r["pass@k"]["pass@1"] for name, r in results.items()}


def _gathered_eval(stage: torch.nn.Module, tokenizer, cfg, model_cfg, rank: int, opts) -> dict:
    import shutil
    from pathlib import Path

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from megatron_sc2.convert.verify import load_our_model
    from megatron_sc2.eval.run import evaluate

    if not cfg.save:
        raise ConfigError("--eval-code-interval under several processes needs --save (the model is "
                          "gathered through a temporary checkpoint there)")
    tmp = Path(cfg.save) / "code_eval.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    sd = get_model_state_dict(stage)
    if model_cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # the last stage's copy of the embedding
    dcp.save({"model": sd}, checkpoint_id=str(tmp))
    del sd
    box: list = [None]
    if rank == 0:
        try:
            full = load_our_model(tmp, model_cfg).to(next(stage.parameters()).device)
            box[0] = ("ok", evaluate(full, tokenizer, opts)[0])
            del full
        except UserError as e:  # every rank stops with it, rather than waiting on rank 0
            box[0] = ("error", str(e))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise ConfigError(value)
    return value
