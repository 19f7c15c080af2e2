"""`megatron-sc2 train` under torchrun: a checkpoint written at TP2 x PP2 resumes at TP1 x PP1
(one process) and at DP2 with the same next-step loss as resuming at TP2 x PP2; metrics.jsonl
is written once, with throughput, TFLOP/s, MFU and per-rank peak memory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BASE = ["--model", "starcoder2-tiny", "--mock-data", "--seq-length", "32",  # window 16 < 32
        "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-warmup-iters", "1", "--clip-grad", "1.0", "--log-interval", "1", "--seed", "5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(nproc: int, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_sc2.cli", "train", *BASE, *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "megatron_sc2.cli", "train", *BASE, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return proc


def _metrics(d: Path) -> list[dict]:
    return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]


def test_checkpoint_resumes_under_other_layouts(tmp_path):
    first = tmp_path / "tp2pp2"
    _train(4, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
           "--train-iters", "4", "--exit-interval", "3", "--save", str(first))
    records = _metrics(first)
    assert [r["step"] for r in records] == [1, 2, 3]  # one writer, one record per step
    last = records[-1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples", "tflops_per_device",
                "mfu", "peak_memory_bytes"):
        assert last[key] is not None and last[key] >= 0, key
    assert len(last["peak_memory_bytes_per_rank"]) == 4
    assert (first / "iter_0000003" / "complete").is_file()

    next_loss = {}
    for name, nproc, flags in [
            ("tp2pp2", 4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
            ("tp1pp1", 1, []),
            ("dp2", 2, [])]:
        out = tmp_path / f"resume_{name}"
        _train(nproc, *flags, "--train-iters", "4", "--load", str(first), "--save", str(out),
               "--log-dir", str(out))
        recs = _metrics(out)
        assert [r["step"] for r in recs] == [4], recs
        next_loss[name] = recs[0]["loss"]
        grad = recs[0]["grad_norm"]
        next_loss[name + "_grad_norm"] = grad
    ref = next_loss["tp2pp2"]
    for name in ("tp1pp1", "dp2"):
        assert abs(next_loss[name] - ref) <= 1e-5 * abs(ref), next_loss
        g, gref = next_loss[name + "_grad_norm"], next_loss["tp2pp2_grad_norm"]
        assert abs(g - gref) <= 1e-4 * abs(gref), next_loss
