"""Real slurm jobs (the one-host cluster of ../shared/slurm-local, started by .ci/run) made by
`megatron-sc2 submit`: a signalled job saves, requeues and resumes to the same losses as an
uninterrupted run; a 2-task job trains like one process; a killed or hung rank ends the job
quickly with a one-line error.

Skipped (not failed) where slurm is not installed or its controller is not up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_sc2.launch import slurm
from megatron_sc2.launch.submit import submit

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(slurm.unavailable() is not None,
                                reason=f"slurm: {slurm.unavailable()}")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _losses(save: Path) -> list[tuple[int, float]]:
    path = save / "metrics.jsonl"
    if not path.is_file():
        return []
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines()) if r]


def _reference(args: list[str], log: Path) -> subprocess.Popen:
    """The same training, uninterrupted, as one plain process (no slurm)."""
    f = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "megatron_sc2.cli", "train", *args], cwd=REPO,
                            env=_env(), stdout=f, stderr=subprocess.STDOUT)


def _train_args(save: Path, iters: int, *extra: str) -> list[str]:
    return ["--mock-data", "--model", "starcoder2-tiny", "--num-layers", "2", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
            "--lr-warmup-iters", "3", "--train-iters", str(iters), "--log-interval", "1",
            "--save", str(save), *extra]


def _submit(tmp: Path, tasks: int, train: list[str], *opts: str) -> str:
    argv = ["--nodes", "1", "--ntasks-per-node", str(tasks), "--time", "00:10:00",
            "--job-name", f"sc2 test $(exit 3) {tmp.name}", *opts, "--", *train]
    old = os.getcwd()
    os.chdir(REPO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in _env().items():
                mp.setenv(k, v)
            result = submit(argv)
    finally:
        os.chdir(old)
    assert result.job_id and result.script_path and result.script_path.is_file()
    return result.job_id


def _wait_requeued_job(job: str, timeout: float) -> dict[str, str]:
    """Wait for a job that requeues itself to finish. Once slurm's requeue hold is over (the job's
    EligibleTime passed) it would still wait for the next scheduling pass (up to a minute here);
    `scontrol update StartTime=now` asks for that pass at once."""
    from datetime import datetime

    deadline, nudged = time.monotonic() + timeout, False
    while time.monotonic() < deadline and not nudged:
        info = slurm.job_info(job)
        if info.get("JobState") in slurm.FINAL_STATES:
            return info
        eligible = info.get("EligibleTime", "")
        if info.get("JobState") == "PENDING" and info.get("Restarts", "0") != "0" and eligible[:2] == "20" \
                and datetime.now() >= datetime.fromisoformat(eligible):
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
            nudged = True
        time.sleep(0.3)
    return slurm.wait_job(job, max(deadline - time.monotonic(), 1.0))


def _flat_model(path: Path, out: Path) -> dict[str, "torch.Tensor"]:
    """The model tensors of a DCP checkpoint, read by torch's own converter."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=False)["model"]


def test_two_task_jobs_train_like_one_process_and_resume_bit_for_bit(tmp_path):
    """Two 2-task gloo jobs from `megatron-sc2 submit`: one runs through; the other is signalled
    (USR1), saves, requeues itself and resumes. The first matches a single process (fp32,
    relative 1e-5); the second matches the first bit for bit."""
    import torch

    from megatron_sc2.training.checkpoint import find_checkpoint, read_meta

    iters = 20
    # The resumed run's directory has a name a shell would expand if anything quoted it wrongly.
    whole, parts, single = tmp_path / "whole", tmp_path / "parts $(touch PWNED) 'q'", tmp_path / "single"
    job_whole = _submit(tmp_path, 2, _train_args(whole, iters))
    job_parts = _submit(tmp_path, 2, _train_args(parts, iters))
    ref = _reference(_train_args(single, iters), tmp_path / "single.log")
    try:
        slurm.wait_until(lambda: len(_losses(parts)) >= 3, 150, "the job's first steps")
        sent = subprocess.run(["scancel", "--signal=USR1", job_parts], capture_output=True, text=True)
        assert sent.returncode == 0, sent.stderr
        info_whole = slurm.wait_job(job_whole, 200)
        info_parts = _wait_requeued_job(job_parts, 200)
    finally:
        ref.wait(timeout=300)
    out_whole, out_parts = slurm.job_output(info_whole), slurm.job_output(info_parts)
    assert info_whole["JobState"] == "COMPLETED" and info_whole["ExitCode"] == "0:0", out_whole
    assert info_parts["JobState"] == "COMPLETED" and info_parts.get("Restarts") == "1", (info_parts, out_parts)
    assert "SIGUSR1 received" in out_parts and f"requeued slurm job {job_parts}" in out_parts, out_parts
    assert ref.returncode == 0, (tmp_path / "single.log").read_text()

    one, two, resumed = _losses(single), _losses(whole), _losses(parts)
    assert [s for s, _ in two] == list(range(1, iters + 1))
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)
    assert resumed == two  # bit for bit across the requeue, every step
    stopped_at = int(out_parts.split("stopping after step ")[1].split(":")[0])
    assert 3 <= stopped_at < iters and "restart 1" in out_parts and "loaded checkpoint" in out_parts
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists()

    ck = find_checkpoint(whole)
    meta = read_meta(ck)
    assert meta["iteration"] == iters and meta["consumed_samples"] == iters * 4
    assert meta["parallel_layout"]["world_size"] == 2
    got = _flat_model(ck, tmp_path / "two.pt")
    want = _flat_model(find_checkpoint(single), tmp_path / "one.pt")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_rank_ends_the_job_with_an_error_within_a_minute(tmp_path, how):
    """Rank 1 is killed (gloo sees the closed connection) or stopped (the 15 s collective
    timeout fires) in the middle of training: rank 0 reports it in one line, the job fails."""
    save = tmp_path / "run"
    job = _submit(tmp_path, 2, _train_args(save, 100000, "--distributed-timeout-minutes", "0.25"))
    slurm.wait_until(lambda: len(_losses(save)) >= 2, 150, "the job's first steps")
    pids = slurm.wait_until(lambda: (slurm.task_pids(job).get(1) or None), 30, "rank 1's pid")
    victims = [p for p in pids if "megatron_sc2" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    assert victims, pids
    hit_at = time.monotonic()
    for pid in victims:
        os.kill(pid, getattr(signal, how))
    info = slurm.wait_job(job, 90)
    elapsed = time.monotonic() - hit_at
    out = slurm.job_output(info)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, out)
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after rank 1 got {how}"
    assert "rank 0 of 2: a collective with the other ranks failed" in out, out  # one line from rank 0
    assert "Traceback" not in out, out
    if how == "SIGKILL":
        assert "task 1: Killed" in out, out  # srun names the dead rank
    else:
        assert "Timed out" in out, out
