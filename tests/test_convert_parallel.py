"""Conversion against the parallel trainer: one 4-process world (`megatron-sc2 train` under
torchrun at TP2 x PP2) that starts from a `convert from-hf` checkpoint and saves after each step.

- from-hf then training at TP2 x PP2: step 1's loss (computed by the parallel model before
  its first update) equals transformers' loss on the same samples with the source weights;
- the checkpoint written at TP2 x PP2 after step 1 exports (to-hf) to a directory whose
  transformers model gives step 2's loss, i.e. what the training model computed with those
  weights;
- `megatron-sc2 eval` on that checkpoint and on its export produces the same samples, and
  `--eval-code-interval` during the TP2 x PP2 run (the model gathered to rank 0) logs pass@1
  without changing the losses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from megatron_sc2 import cli
from megatron_sc2.data.mock_data import MockDataset

from test_convert import make_hf_dir

REPO = Path(__file__).resolve().parent.parent
SEQ, GBS, SEED, VOCAB = 32, 4, 5, 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hf_loss(hf_dir: Path, step: int) -> float:
    """transformers' mean token loss on the global batch of training step `step` (1-based)."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ds = MockDataset(VOCAB, SEQ, SEED)
    samples = torch.from_numpy(np.stack([ds[i] for i in range((step - 1) * GBS, step * GBS)]))
    with torch.no_grad():
        logits = model(samples[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), samples[:, 1:].reshape(-1)).item()


def test_from_hf_trains_at_tp2_pp2_and_exports_the_training_models_outputs(tmp_path):
    src, ck, run = tmp_path / "src", tmp_path / "ck", tmp_path / "run"
    make_hf_dir(src, True, torch.float32, seed=11)
    assert cli.main(["convert", "from-hf", "--load", str(src), "--save", str(ck),
                     "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]) == 0

    from test_eval_cli import eval_tokenizer

    tok = eval_tokenizer(tmp_path / "tok")  # for --eval-code-interval, and the evals below
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "megatron_sc2.cli", "train", "--model", "starcoder2-tiny", "--mock-data",
           "--seq-length", str(SEQ), "--micro-batch-size", "1", "--global-batch-size", str(GBS),
           "--seed", str(SEED), "--lr", "3e-3", "--min-lr", "3e-4", "--log-interval", "1",
           "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
           "--train-iters", "2", "--save-interval", "1", "--load", str(ck), "--save", str(run),
           "--tokenizer-model", str(tok), "--eval-code-interval", "1", "--eval-code-limit", "1",
           "--eval-code-max-new-tokens", "8", "--eval-code-workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert [r["step"] for r in records] == [1, 2]
    # the code eval ran on the gathered model at each step and left training as it was (the
    # losses below), and its temporary checkpoint is gone
    assert all(0.0 <= r["code_pass@1/humaneval"] <= 1.0 for r in records)
    assert not (run / "code_eval.tmp").exists()

    expect1 = _hf_loss(src, 1)
    assert abs(records[0]["loss"] - expect1) <= 1e-5 * expect1, (records[0]["loss"], expect1)

    out = tmp_path / "hf_step1"
    assert cli.main(["convert", "to-hf", "--load", str(run), "--iteration", "1", "--save", str(out),
                     "--verify-logits"]) == 0
    expect2 = _hf_loss(out, 2)
    assert abs(records[1]["loss"] - expect2) <= 1e-5 * expect2, (records[1]["loss"], expect2)
    # The weights did move: the step-1 export is not the source model.
    assert abs(_hf_loss(src, 2) - expect2) > 1e-3

    # `megatron-sc2 eval` from the TP2 x PP2 checkpoint equals the same eval from its HF export.
    samples = []
    for load, o in ((run / "iter_0000001", "eval_ck"), (out, "eval_hf")):
        assert cli.main(["eval", "--load", str(load), "--tokenizer", str(tok), "--tasks", "humaneval",
                         "--limit", "1", "--n-samples", "3", "--temperature", "1.0", "--max-new-tokens",
                         "24", "--no-progress", "--workers", "2", "--output", str(tmp_path / o)]) == 0
        recs = [json.loads(l) for l in (tmp_path / o / "samples.jsonl").read_text().splitlines()]
        samples.append([{k: v for k, v in r.items() if k != "seconds"} for r in recs])
    assert samples[0] == samples[1] and len(samples[0]) == 3
    assert len({r["completion"] for r in samples[0]}) == 3  # three different samples
