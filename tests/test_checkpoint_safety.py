"""Checkpoint safety under SIGKILL: a training process killed at random moments while it saves
(several trials, each resuming from what the previous one left) always leaves a latest checkpoint
that torch's own DCP reader loads and that equals, tensor for tensor, the checkpoint of an
uninterrupted run at the same step; the run finished after all the kills has that run's losses,
bit for bit. Also --keep-last."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint  # noqa: F401 - imported once here, inherited by the forks
import torch.distributed.checkpoint.state_dict  # noqa: F401
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_sc2.config import parse_train_args
from megatron_sc2.training import checkpoint as ckpt
from megatron_sc2.training.metrics import read_metrics
from megatron_sc2.training.trainer import Trainer

ITERS = 8
TRIALS = 6


pytestmark = pytest.mark.usefixtures("one_process")


def _args(save: Path, *extra: str) -> list[str]:
    # A save after every step, each taking longer (DCP's writes and fsyncs) than the tiny step:
    # most of the run's time is spent saving.
    return ["--mock-data", "--model", "starcoder2-tiny", "--seq-length", "16", "--micro-batch-size", "1",
            "--global-batch-size", "1", "--lr", "1e-3", "--train-iters", str(ITERS), "--save-interval", "1",
            "--save", str(save), "--load", str(save), "--log-interval", "1", *extra]


def _train(argv: list[str]) -> None:
    """Child process body (forked): quiet, one thread, train."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.stdout = sys.stderr = open(os.devnull, "w")
    torch.set_num_threads(1)
    Trainer(parse_train_args(argv)).train()
    os._exit(0)


def _start(argv: list[str]) -> mp.Process:
    p = mp.get_context("fork").Process(target=_train, args=(argv,))
    p.start()
    return p


def _flat(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read by torch's DCP-to-torch.save converter (not our code)."""
    out = tmp / f"{path.parent.name}-{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    state = torch.load(out, weights_only=False)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = obj
    walk("", state)
    return flat


def _own_temporaries(save: Path, pid: int) -> list[Path]:
    return list(save.glob(f"iter_*.tmp-{pid}"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("reference")
    p = _start(_args(ref))
    p.join(300)
    assert p.exitcode == 0
    assert ckpt.finished_iterations(ref) == list(range(1, ITERS + 1))
    return ref


def test_sigkill_during_saves_always_leaves_a_loadable_latest_checkpoint(reference, tmp_path):
    rng = random.Random(1234)
    save = tmp_path / "run"
    conv = tmp_path / "converted"
    conv.mkdir()
    last_iteration, mid_save = 0, 0
    wanted: dict[int, dict] = {}
    for trial in range(TRIALS):
        p = _start(_args(save, "--keep-last", "2"))
        # Wait for this process to be inside a save (its temporary directory exists) with an
        # earlier checkpoint finished, then kill it at a random moment of the next ~60 ms: while
        # writing tensors, metadata, the marker, during the rename, or just after.
        deadline = time.monotonic() + 120
        while p.is_alive() and time.monotonic() < deadline and not (
                _own_temporaries(save, p.pid) and ckpt.finished_iterations(save)):
            time.sleep(0.001)
        if not p.is_alive():
            p.join()
            break  # it finished training before we caught it saving: the trials are over
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL
        mid_save += bool(_own_temporaries(save, p.pid))

        latest = ckpt.find_checkpoint(save)  # raises when nothing loadable is left
        meta = ckpt.read_meta(latest)
        it = meta["iteration"]
        assert it >= max(last_iteration, 1), (trial, it, last_iteration)
        assert latest == ckpt.checkpoint_dir(save, max(ckpt.finished_iterations(save)))
        assert meta["consumed_samples"] == it
        if it not in wanted:
            wanted[it] = _flat(ckpt.checkpoint_dir(reference, it), conv)
        got, want = _flat(latest, conv), wanted[it]
        assert got.keys() == want.keys() and any("optimizer" in k for k in got)
        for k in want:
            same = torch.equal(got[k], want[k]) if isinstance(want[k], torch.Tensor) else got[k] == want[k]
            assert same, (trial, it, k)
        last_iteration = it
    assert mid_save >= TRIALS // 2, f"only {mid_save} of {TRIALS} kills hit a save in progress"

    p = _start(_args(save, "--keep-last", "2"))  # finish the run from whatever is left
    p.join(300)
    assert p.exitcode == 0
    assert [r["loss"] for r in read_metrics(save)] == [r["loss"] for r in read_metrics(reference)]
    assert ckpt.finished_iterations(save) == [ITERS - 1, ITERS]  # --keep-last 2
    assert not list(save.glob("iter_*.tmp-*")), "a dead save's temporary directory was left behind"


def test_latest_is_the_newest_finished_checkpoint_when_the_tracker_lags(tmp_path):
    # A kill between a checkpoint's rename and the tracker's update leaves the tracker one save
    # behind: the finished newer checkpoint is the latest, not the one the tracker names.
    for it in (1, 2, 3):
        d = ckpt.checkpoint_dir(tmp_path, it)
        d.mkdir(parents=True)
        (d / ckpt.META_FILE).write_text("{}")
        (d / ckpt.COMPLETE_MARKER).write_text("")
    (tmp_path / ckpt.LATEST_FILE).write_text("2\n")
    (ckpt.checkpoint_dir(tmp_path, 4)).mkdir()  # an unfinished save (no marker) is never latest
    assert ckpt.find_checkpoint(tmp_path) == ckpt.checkpoint_dir(tmp_path, 3)
    assert ckpt.find_checkpoint(tmp_path, iteration=2) == ckpt.checkpoint_dir(tmp_path, 2)
