"""`--eval-code-interval`: pass@1 lands in metrics.jsonl and training is exactly what it is
without the evaluation (and across a resume). The trainer knows nothing of eval: the run built
by `megatron-sc2 train` (train_command.build_trainer) hands it eval's hook."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from megatron_sc2.config import parse_train_args
from megatron_sc2.errors import ConfigError
from megatron_sc2.train_command import build_trainer
from megatron_sc2.training.metrics import read_metrics
from megatron_sc2.training.trainer import Trainer

from test_eval_cli import eval_tokenizer

pytestmark = pytest.mark.usefixtures("one_process")
KEY = "code_pass@1/humaneval"


def _args(tok: Path, save: Path, *extra: str) -> list[str]:
    return ["--model", "starcoder2-tiny", "--mock-data", "--tokenizer-model", str(tok),
            "--max-position-embeddings", "512", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4", "--train-iters", "3",
            "--seed", "5", "--save", str(save), "--save-interval", "2", *extra]


def test_code_eval_logs_pass_at_1_and_leaves_training_unchanged(tmp_path):
    tok = eval_tokenizer(tmp_path / "tok")
    hook = ["--eval-code-interval", "2", "--eval-code-limit", "1", "--eval-code-max-new-tokens", "8"]
    build_trainer(parse_train_args(_args(tok, tmp_path / "a", *hook))).train()
    Trainer(parse_train_args(_args(tok, tmp_path / "b"))).train()
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in a if KEY in r] == [2]
    assert all(0.0 <= r[KEY] <= 1.0 for r in a if KEY in r)
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]
    # resumed from the step-2 checkpoint (saved right after the evaluation): step 3 as before
    build_trainer(parse_train_args(_args(tok, tmp_path / "c", *hook, "--load", str(tmp_path / "a" / "iter_0000002")))).train()
    c = read_metrics(tmp_path / "c")
    assert [(r["step"], r["loss"]) for r in c if r["step"] > 2] == [(r["step"], r["loss"]) for r in a if r["step"] > 2]


def test_code_eval_keeps_rng_and_mode(tmp_path):
    from megatron_sc2.data.tokenizer import load_tokenizer
    from megatron_sc2.eval.during_training import code_eval_during_training

    tok = eval_tokenizer(tmp_path / "tok")
    cfg = parse_train_args(_args(tok, tmp_path / "x", "--eval-code-interval", "1", "--eval-code-limit", "1",
                                 "--eval-code-max-new-tokens", "4"))
    from megatron_sc2.model import StarCoder2

    model = StarCoder2(cfg.model_config(512)).train()
    torch.manual_seed(1)
    random.seed(1)
    state, py = torch.get_rng_state(), random.getstate()
    out = code_eval_during_training(model, load_tokenizer(tok), cfg, model.cfg, world_size=1, rank=0)
    assert set(out) == {KEY} and model.training
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py
    with pytest.raises(ConfigError, match="needs --tokenizer-model"):
        code_eval_during_training(model, None, cfg, model.cfg, world_size=1, rank=0)
    with pytest.raises(ConfigError, match="needs --tokenizer-model"):  # refused before step 1
        parse_train_args([a for a in _args(tok, tmp_path / "z", "--eval-code-interval", "1")
                          if a not in ("--tokenizer-model", str(tok))])
    with pytest.raises(ConfigError, match="--eval-code-tasks: unknown task 'mbpp'"):
        parse_train_args(_args(tok, tmp_path / "y", "--eval-code-interval", "1", "--eval-code-tasks", "mbpp"))


def test_a_trainer_without_the_hook_refuses_the_flag_and_hooks_run_on_their_steps(tmp_path):
    tok = eval_tokenizer(tmp_path / "tok")
    cfg = parse_train_args(_args(tok, tmp_path / "z", "--eval-code-interval", "2"))
    with pytest.raises(ConfigError, match="--eval-code-interval is set but this run has no hook"):
        Trainer(cfg)  # never silently skipped

    class Count:  # a step hook from outside training (training/hooks.py StepHook)
        flag = "--count"

        def __init__(self, every: int):
            self.every, self.steps = every, []

        def __call__(self, step, view):
            assert view.model is trainer.model and view.world_size == 1 and view.rank == 0
            self.steps.append(step)
            return {"count/steps": float(len(self.steps))}

    plain = parse_train_args(_args(tok, tmp_path / "h", "--log-interval", "100"))
    with pytest.raises(ConfigError, match="--count: a step hook must run every N >= 1 steps"):
        Trainer(plain, [Count(0)])
    hook = Count(2)
    trainer = Trainer(plain, [hook])
    records = trainer.train()
    assert hook.steps == [2]
    # the hook's step is logged although it is not a log step (3 is: the last)
    assert [(r["step"], r.get("count/steps")) for r in read_metrics(tmp_path / "h")] == [(2, 1.0), (3, None)]
    assert [r["step"] for r in records] == [1, 2, 3]
