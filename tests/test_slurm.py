"""Real slurm jobs (the one-host cluster of ../shared/slurm-local, started by .ci/run) made by
`megatron-sc2 submit`: a signalled job saves, requeues and resumes to the same losses as an
uninterrupted run; a 2-task job trains like one process; a killed rank ends the job quickly.

Skipped (not failed) where slurm is not installed or its controller is not up.
"""

from __future__ import annotations

import json
import os
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


def test_signalled_job_saves_requeues_and_resumes_bit_for_bit(tmp_path):
    iters = 40
    # A directory name a shell would expand if anything quoted it wrongly.
    save = tmp_path / "run $(touch PWNED) 'q'"
    ref_dir = tmp_path / "reference"
    job = _submit(tmp_path, 1, _train_args(save, iters))
    ref = _reference(_train_args(ref_dir, iters), tmp_path / "reference.log")
    try:
        # Once the job logged a few steps, deliver the script's --signal (USR1) to its tasks now
        # instead of waiting for slurmctld's periodic time-limit check.
        slurm.wait_until(lambda: len(_losses(save)) >= 3, 120, "the job's first steps")
        sent = subprocess.run(["scancel", "--signal=USR1", job], capture_output=True, text=True)
        assert sent.returncode == 0, sent.stderr
        info = slurm.wait_job(job, 150)
    finally:
        ref.wait(timeout=300)
    out = slurm.job_output(info)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out)
    assert info.get("Restarts") == "1", (info, out)
    assert "SIGUSR1 received" in out and f"requeued slurm job {job}" in out, out
    assert "restart 1" in out and "loaded checkpoint" in out, out
    assert not (REPO / "PWNED").exists() and not (save / "PWNED").exists()

    stopped_at = int(out.split("stopping after step ")[1].split(":")[0])
    assert 3 <= stopped_at < iters, out
    assert ref.returncode == 0, (tmp_path / "reference.log").read_text()
    got, want = _losses(save), _losses(ref_dir)
    assert [s for s, _ in want] == list(range(1, iters + 1))
    assert got == want  # every step's loss, bit for bit, across the requeue
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)
