"""`megatron-sc2 train` under torchrun: a checkpoint written at TP2 x PP2 resumes at TP1 x PP1
(one process) and at DP2 with the same next-step loss as resuming at TP2 x PP2; metrics.jsonl
is written once, with throughput, TFLOP/s, MFU and per-rank peak memory. All runs use
--reset-position-ids --reset-attention-mask, so the validation losses compared across layouts
(one process, DP2, PP2, TP2 x PP2) also check that every layout validates with the position and
document ids. A checkpoint written at CP2 x TP2 resumes in one process."""

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
        "--lr-warmup-iters", "1", "--clip-grad", "1.0", "--log-interval", "1", "--seed", "5",
        "--eval-interval", "4", "--eval-iters", "1",
        # Packed documents (mock data has end-of-document tokens): training and validation
        # must both restart positions and keep attention inside documents under every layout.
        "--reset-position-ids", "--reset-attention-mask"]


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
    """TP2 x PP2 runs 4 steps, saving after step 3 in the background (--async-save: step 4 runs
    while it is written). Resuming that checkpoint at TP1 x PP1 and at DP2 must give step 4 as
    the uninterrupted TP2 x PP2 run computed it (which is what resuming at TP2 x PP2 must also
    give: resume is exact)."""
    first = tmp_path / "tp2pp2"
    proc = _train(4, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                  "--train-iters", "4", "--save-interval", "3", "--save", str(first), "--async-save")
    assert "saving checkpoint of iteration 3 in the background" in proc.stdout
    assert sorted(p.name for p in first.glob("iter_*")) == ["iter_0000003", "iter_0000004"]
    records = _metrics(first)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one writer, one record per step
    last = records[-1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples", "tflops_per_device",
                "mfu", "peak_memory_bytes"):
        assert last[key] is not None and last[key] >= 0, key
    assert len(last["peak_memory_bytes_per_rank"]) == 4
    saved = first / "iter_0000003"
    assert (saved / "complete").is_file()
    # The one-process exporter reads what four ranks wrote, and its logits check passes.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    conv = subprocess.run([sys.executable, "-m", "megatron_sc2.cli", "convert", "to-hf", "--load",
                           str(saved), "--save", str(tmp_path / "hf"), "--dtype", "fp32",
                           "--verify-logits", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert conv.returncode == 0, conv.stdout[-2000:] + conv.stderr[-3000:]

    # pp2: the last stage loads its copy of the tied embedding (and its Adam state) from the
    # embedding's entries.
    for name, nproc, flags in [("tp1pp1", 1, []), ("dp2", 2, []),
                               ("pp2", 2, ["--pipeline-model-parallel-size", "2"])]:
        out = tmp_path / f"resume_{name}"
        _train(nproc, *flags, "--train-iters", "4", "--load", str(saved), "--save", str(out))
        recs = _metrics(out)
        assert [r["step"] for r in recs] == [4], recs
        got = recs[0]
        assert got["consumed_samples"] == last["consumed_samples"]
        assert abs(got["loss"] - last["loss"]) <= 1e-5 * abs(last["loss"]), (name, got, last)
        assert abs(got["grad_norm"] - last["grad_norm"]) <= 1e-5 * abs(last["grad_norm"]), (name, got, last)
        # Validation after step 4 (forward-only pipeline schedule at TP2 x PP2).
        assert abs(got["valid_loss"] - last["valid_loss"]) <= 1e-5 * abs(last["valid_loss"]), (name, got, last)


def test_checkpoint_saved_under_context_parallel_resumes_in_one_process(tmp_path):
    """CP2 x TP2 (sequence 32 in two chunks of 16, window 16: each chunk's queries reach 15
    positions into the other's) saves after step 2; one process resumes it and computes step 3
    as the uninterrupted CP2 x TP2 run did."""
    first = tmp_path / "cp2tp2"
    proc = _train(4, "--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
                  "--train-iters", "3", "--save-interval", "2", "--save", str(first))
    assert "TP2 x CP2 x PP1 x DP1" in proc.stdout
    assert "positions before its chunk (window 16)" in proc.stdout
    last = _metrics(first)[-1]
    assert last["step"] == 3
    out = tmp_path / "resume_cp1"
    _train(1, "--train-iters", "3", "--load", str(first / "iter_0000002"), "--save", str(out))
    got = _metrics(out)
    assert [r["step"] for r in got] == [3], got
    assert got[0]["consumed_samples"] == last["consumed_samples"]
    assert abs(got[0]["loss"] - last["loss"]) <= 1e-5 * abs(last["loss"]), (got[0], last)
    assert abs(got[0]["grad_norm"] - last["grad_norm"]) <= 1e-5 * abs(last["grad_norm"]), (got[0], last)
