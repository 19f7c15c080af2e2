"""Metrics sinks and --compile in a single-process run: TensorBoard event files hold the logged
scalars (read back with TensorBoard's own EventAccumulator), W&B is optional and a clear error
when asked for without the package, and --compile trains to the uncompiled losses."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from megatron_sc2 import cli
from megatron_sc2.config import TrainConfig, parse_train_args
from megatron_sc2.errors import ConfigError
from megatron_sc2.parallel.layout import layout_from_args
from megatron_sc2.training.metrics import read_metrics
from megatron_sc2.training.sinks import SCALARS
from megatron_sc2.training.trainer import Trainer, train

pytestmark = pytest.mark.usefixtures("one_process")


def _args(save: Path, *extra: str) -> list[str]:
    return ["--model", "starcoder2-tiny", "--mock-data", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
            "--lr", "3e-3", "--save", str(save), "--save-interval", "0", *extra]


def _events(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    tb = tmp_path / "tb"
    train(parse_train_args(_args(tmp_path / "ckpt", "--tensorboard-dir", str(tb),
                                 "--eval-interval", "2", "--eval-iters", "1")))
    logged = read_metrics(tmp_path / "ckpt")
    events = _events(tb)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes",
                "tflops_per_device", "valid_loss"):
        want = [(r["step"], r[key]) for r in logged if r.get(key) is not None]
        got = events[SCALARS[key]]
        assert [s for s, _ in got] == [s for s, _ in want] and want, key
        for (_, a), (_, b) in zip(got, want):  # event files store float32
            assert a == pytest.approx(b, rel=1e-6, abs=1e-30), key
    assert [s for s, _ in events["lm loss validation"]] == [2, 4]
    # MFU needs the device's peak FLOP/s, which a CPU does not have: logged only when known.
    assert ("mfu" in events) == any(r.get("mfu") is not None for r in logged)


def test_tensorboard_resume_keeps_one_curve(tmp_path):
    tb, ckpt = tmp_path / "tb", tmp_path / "ckpt"
    train(parse_train_args(_args(ckpt, "--tensorboard-dir", str(tb), "--exit-interval", "2")))
    train(parse_train_args(_args(ckpt, "--tensorboard-dir", str(tb), "--load", str(ckpt))))
    steps = [s for s, _ in _events(tb)["lm loss"]]
    assert steps == [1, 2, 3, 4]
    assert [v for _, v in _events(tb)["lm loss"]] == pytest.approx(
        [r["loss"] for r in read_metrics(ckpt)], rel=1e-6)


def test_wandb_missing_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert cli.main(["train", *_args(tmp_path, "--wandb-project", "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wandb package" in err and "--wandb-project" in err


def test_wandb_gets_the_scalars_when_installed(tmp_path, monkeypatch):
    # wandb is not installed here: a stand-in module records what our sink hands to its API
    # (wandb.init(project, name, dir, config) and run.log(dict, step)).
    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"].append(True)

    def init(**kw):
        calls["init"].append(kw)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    train(parse_train_args(_args(tmp_path, "--wandb-project", "proj", "--wandb-exp-name", "x")))
    assert calls["init"][0]["project"] == "proj" and calls["init"][0]["name"] == "x"
    assert calls["init"][0]["config"]["wandb_project"] == "proj"
    logged = read_metrics(tmp_path)
    assert [s for s, _ in calls["log"]] == [r["step"] for r in logged]
    assert [d["lm loss"] for _, d in calls["log"]] == [r["loss"] for r in logged]
    assert calls["finish"] == [True]


def test_compile_trains_to_the_uncompiled_losses(tmp_path):
    plain = Trainer(parse_train_args(_args(tmp_path / "a", "--train-iters", "3"))).train()
    trainer = Trainer(parse_train_args(_args(tmp_path / "b", "--train-iters", "3", "--compile")))
    compiled = trainer.train()
    for a, b in zip(plain, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    # Compiled in place: the parameter names (and so checkpoints) are the uncompiled ones.
    assert all("_orig_mod" not in n for n, _ in trainer.model.named_parameters())


def test_compile_with_tensor_parallel_is_refused():
    cfg = TrainConfig(model="starcoder2-tiny", compile=True, tensor_model_parallel_size=2,
                      seq_length=32)
    with pytest.raises(ConfigError, match="--compile .* --tensor-model-parallel-size"):
        layout_from_args(cfg, 2, cfg.model_config())


def test_tensorboard_resume_purges_steps_after_the_checkpoint(tmp_path):
    # A run logged steps 1-4 but its last checkpoint is step 2: the resumed run's 3 and 4
    # replace the old ones instead of doubling them.
    from megatron_sc2.training.sinks import TensorBoardSink

    first = TensorBoardSink(tmp_path)
    for step in (1, 2, 3, 4):
        first.write({"step": step, "loss": float(step)})
    first.close()
    again = TensorBoardSink(tmp_path, resume_from_step=2)
    for step in (3, 4):
        again.write({"step": step, "loss": 10.0 * step})
    again.close()
    assert _events(tmp_path)["lm loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_code_evaluation_scores_reach_tensorboard(tmp_path):
    # --eval-code-interval adds code_pass@1/<task> to the step's record; TensorBoard gets it.
    from megatron_sc2.training.sinks import TensorBoardSink

    sink = TensorBoardSink(tmp_path)
    sink.write({"step": 3, "loss": 2.0, "code_pass@1/humaneval": 0.25})
    sink.close()
    ev = _events(tmp_path)
    assert ev["code_pass@1/humaneval"] == [(3, 0.25)] and ev["lm loss"] == [(3, 2.0)]
