"""bench/gpu_check.sh on a machine whose python cannot import torch: it says so in one line of
its summary and stops with status 1 instead of failing step by step (the GPU steps themselves
need a GPU machine: see bench/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_stops_clearly_without_torch(tmp_path):
    fake = tmp_path / "python-without-site"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # -S: no site-packages
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out)],
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert "torch is not importable" in summary
    assert "torch MISSING" in (out / "env.log").read_text()


def test_gpu_check_usage_error():
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr
