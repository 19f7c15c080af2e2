"""The 16k stage: resume a 4k-stage checkpoint at a longer sequence with the rotary base raised
tenfold, optimizer state kept (the recipe in examples/long_context/), on a tiny model and real code."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megatron_sc2.config import parse_train_args, preset
from megatron_sc2.errors import CheckpointError
from megatron_sc2.training.checkpoint import find_checkpoint, read_meta
from megatron_sc2.training.trainer import Trainer

from test_training import corpus  # noqa: F401  (the shared real-code fixture)

pytestmark = pytest.mark.usefixtures("one_process")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "long_context"


def _args(corpus, save: Path, seq: int, *extra: str) -> list[str]:  # noqa: F811
    return ["--model", "starcoder2-tiny", "--data-path", corpus["data"],
            "--tokenizer-model", corpus["tokenizer"], "--seq-length", str(seq),
            "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3",
            "--min-lr", "3e-4", "--lr-warmup-iters", "5", "--split", "100,0,0",
            "--data-cache-path", str(save / "cache"), "--save", str(save), *extra]


def test_resume_at_longer_sequence_and_tenfold_rope_keeps_optimizer_and_trains(corpus, tmp_path):  # noqa: F811
    short, long_ = tmp_path / "s1", tmp_path / "s2"
    base = preset("starcoder2-tiny").rope_theta
    Trainer(parse_train_args(_args(corpus, short, 64, "--train-iters", "12"))).train()

    t = Trainer(parse_train_args(_args(corpus, long_, 128, "--train-iters", "24",
                                       "--rotary-base", str(10 * base), "--load", str(short))))
    assert t.model_cfg.rope_theta == 10 * base
    assert t.state.iteration == 12 and t.state.consumed_samples == 96
    steps = {int(s["step"]) for s in t.optimizer.state.values()}
    assert steps == {12}                               # AdamW's moments came with the checkpoint
    records = t.train()
    losses = [r["loss"] for r in records]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    meta = read_meta(find_checkpoint(long_))
    assert meta["iteration"] == 24 and meta["model_config"]["rope_theta"] == 10 * base
    assert meta["train_config"]["seq_length"] == 128


def test_a_shape_change_is_refused_naming_the_field(corpus, tmp_path):  # noqa: F811
    Trainer(parse_train_args(_args(corpus, tmp_path / "a", 64, "--train-iters", "1"))).train()
    with pytest.raises(CheckpointError, match="ffn_hidden_size"):
        Trainer(parse_train_args(_args(corpus, tmp_path / "b", 64, "--train-iters", "2",
                                       "--ffn-hidden-size", "128", "--load", str(tmp_path / "a"))))


def test_the_example_recipe_is_4k_then_16k_with_rope_times_ten():
    s1 = parse_train_args(["--config", str(EXAMPLES / "starcoder2-7b-stage1-4k.yaml"), "--mock-data"])
    s2 = parse_train_args(["--config", str(EXAMPLES / "starcoder2-7b-stage2-16k.yaml"), "--mock-data"])
    assert (s1.seq_length, s2.seq_length) == (4096, 16384)
    assert s1.model == s2.model == "starcoder2-7b"
    assert s1.rotary_base is None and s2.rotary_base == 10 * preset("starcoder2-7b").rope_theta
    assert s2.load == s1.save and not s2.finetune and s2.train_iters > s1.train_iters
