"""Stop signals and time limits inside one process: a signal or --exit-duration-in-mins stops
training after the current step with a checkpoint that resumes to the same losses as an
uninterrupted run; the exit signal asks slurm to requeue (a stand-in `scontrol` records it),
SIGTERM does not; with no trainer alive our handlers step aside."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from megatron_sc2.config import parse_train_args
from megatron_sc2.errors import ConfigError
from megatron_sc2.training.checkpoint import find_checkpoint, read_meta
from megatron_sc2.training.metrics import read_metrics
from megatron_sc2.config import parse_signal
from megatron_sc2.training.signals import StopRequests
from megatron_sc2.training.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_process")


def _args(save: Path, *extra: str) -> list[str]:
    return ["--mock-data", "--model", "starcoder2-tiny", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "6", "--lr", "1e-3", "--lr-warmup-iters", "2",
            "--save", str(save), "--load", str(save), *extra]


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """SLURM_JOB_ID set and a `scontrol` that appends its arguments to a file."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_ / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> "{log}"\n')
    (bin_ / "scontrol").chmod(0o755 | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    return log


def _losses(save: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(save)]


def test_parse_signal_names():
    assert parse_signal("usr1") == parse_signal("SIGUSR1") == parse_signal(str(int(signal.SIGUSR1)))
    with pytest.raises(ConfigError, match="--exit-signal 'SIGFOO'"):
        parse_signal("SIGFOO")


def test_exit_signal_stops_saves_requeues_and_resumes_exactly(tmp_path, fake_slurm):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    Trainer(parse_train_args(_args(whole))).train()
    trainer = Trainer(parse_train_args(_args(parts)))
    os.kill(os.getpid(), signal.SIGUSR1)  # arrives before step 1: recorded, not fatal
    records = trainer.train()
    assert [r["step"] for r in records] == [1]
    assert read_meta(find_checkpoint(parts))["iteration"] == 1
    assert fake_slurm.read_text().split() == ["requeue", "4711"]
    del trainer
    Trainer(parse_train_args(_args(parts))).train()  # what the requeued job runs
    assert _losses(parts) == _losses(whole) and len(_losses(whole)) == 6


def test_sigterm_saves_without_requeue(tmp_path, fake_slurm):
    trainer = Trainer(parse_train_args(_args(tmp_path, "--exit-signal", "USR2")))
    os.kill(os.getpid(), signal.SIGTERM)
    assert [r["step"] for r in trainer.train()] == [1]
    assert read_meta(find_checkpoint(tmp_path))["iteration"] == 1
    assert not fake_slurm.exists()  # preemption/scancel: the cluster decides, we do not requeue


def test_exit_duration_stops_and_requeues(tmp_path, fake_slurm):
    records = Trainer(parse_train_args(_args(tmp_path, "--exit-duration-in-mins", "0"))).train()
    assert [r["step"] for r in records] == [1]
    assert fake_slurm.read_text().split() == ["requeue", "4711"]


def test_no_requeue_when_finished_or_disabled(tmp_path, fake_slurm):
    Trainer(parse_train_args(_args(tmp_path / "a", "--exit-duration-in-mins", "0", "--no-requeue"))).train()
    t = Trainer(parse_train_args(_args(tmp_path / "b", "--train-iters", "1")))
    os.kill(os.getpid(), signal.SIGUSR1)
    t.train()  # the signal came with the last step: nothing left to requeue for
    assert not fake_slurm.exists()


def test_a_finished_run_stops_listening(tmp_path, fake_slurm):
    seen = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        trainer = Trainer(parse_train_args(_args(tmp_path, "--exit-signal", "USR2", "--train-iters", "1")))
        trainer.train()  # the trainer object stays referenced
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]  # not swallowed by the finished run's handler
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_handlers_step_aside_without_a_listener():
    seen = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        stops = StopRequests(exit_signal=signal.SIGUSR2)
        stops.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stops.received == [signal.SIGUSR2] and seen == []
        stops.uninstall()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]  # the handler that was there before ours
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_stop_right_after_a_periodic_save_does_not_save_twice(tmp_path, capsys, fake_slurm):
    trainer = Trainer(parse_train_args(_args(tmp_path, "--save-interval", "1")))
    os.kill(os.getpid(), signal.SIGUSR1)
    trainer.train()
    assert capsys.readouterr().out.count("saved checkpoint") == 1
    assert read_meta(find_checkpoint(tmp_path))["iteration"] == 1
