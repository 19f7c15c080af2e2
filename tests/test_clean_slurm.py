"""`megatron-sc2 clean --slurm 4` on the real local slurm: the job array plus dependent merge give
the single-machine result; with one shard's task killed the merge is cancelled, and submitting
the same command again runs only that shard. Skipped (not failed) where slurm is not up."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from megatron_sc2.cli import main as cli_main
from megatron_sc2.launch import slurm
from megatron_sc2.data.prep.clean.runner import run_local
from megatron_sc2.data.prep.clean.settings import CleanConfig

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(slurm.unavailable() is not None, reason=f"slurm: {slurm.unavailable()}")


def _in_queue(*jobs: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(jobs)], capture_output=True, text=True)
    return bool(out.stdout.strip())


def _wait_gone(*jobs: str, timeout: float = 480) -> None:  # the cluster may be busy with others
    deadline = time.monotonic() + timeout
    while _in_queue(*jobs):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *jobs], capture_output=True)
            raise TimeoutError(f"slurm jobs {jobs} still queued after {timeout:.0f} s")
        time.sleep(0.5)


def _submit(argv: list[str], capsys) -> tuple[str, str]:
    rc = cli_main(["clean", *argv])
    err = capsys.readouterr().err
    assert rc == 0, err
    m = re.search(r"submitted shard array (\d+) .*merge job (\d+)", err)
    assert m, err
    return m.group(1), m.group(2)


def _lines(out: Path) -> list[str]:
    return sorted(l for p in out.glob("part-*.jsonl") for l in p.read_text().splitlines())


def test_slurm_chain_equals_one_machine_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    body = "\n".join(f"def f_{i}(a, b):\n    return a * {i} + b - {3 * i}\n" for i in range(40))
    rows = []
    for r in range(24):
        text = body if r % 3 == 0 else body.replace("f_1(", f"g{r}(") if r % 3 == 1 else f"x_{r} = {r}\n" * (r + 5)
        rows.append({"repo_name": f"repo{r}", "path": "m.py", "content": text + f"# owner{r}@gmail.com\n" * (r % 2)})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = tmp_path / "ref"
    ref_report = run_local(CleanConfig([str(src)], str(ref), exact_dedup=True, near_dedup=True, pii=True), 1).report

    out = tmp_path / "slurm out"  # a space: #SBATCH lines and the command must keep it
    argv = ["--input", str(src), "--output", str(out), "--exact-dedup", "--near-dedup", "--pii",
            "--slurm", "4", "--time", "00:05:00"]
    array, merge_job = _submit(argv + ["--hold"], capsys)
    subprocess.run(["scancel", f"{array}_2"], check=True, capture_output=True)  # kill shard 2's task
    subprocess.run(["scontrol", "release", array], check=True, capture_output=True)
    _wait_gone(array, merge_job)
    work = out / ".clean-work"
    done = sorted(p.name for p in work.glob("shard-*") if (p / "stats.json").is_file())
    assert done == ["shard-00000-of-00004", "shard-00001-of-00004", "shard-00003-of-00004"]
    assert not list(out.glob("part-*")) and not (out / "report.json").exists()

    array2, merge2 = _submit(argv, capsys)
    _wait_gone(array2, merge2)
    logs = {i: (out / "slurm" / f"scan-{array2}_{i}.out").read_text() for i in range(4)}
    assert all("skipped" in logs[i] for i in (0, 1, 3)) and "shard 2/4: done" in logs[2], logs
    assert (out / "report.json").is_file(), list((out / "slurm").glob("merge-*.out"))
    assert _lines(out) == _lines(ref)
    assert (out / "manifest.jsonl").read_text() == (ref / "manifest.jsonl").read_text()
    report = json.loads((out / "report.json").read_text())
    for r in (report, ref_report):
        r.pop("merge_seconds"), r.pop("output"), r.pop("resources")
    assert report == ref_report
