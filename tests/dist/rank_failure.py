"""Worker for tests/test_parallel.py: TP2 training where rank 1 dies (SIGKILL) in the middle
of step 2. The surviving rank must fail fast (gloo sees the closed connection; the process
group timeout is the backstop) rather than hang."""

from __future__ import annotations

import os
import signal
import sys

import torch

from megatron_sc2.config import ModelConfig
from megatron_sc2.parallel.env import init_distributed, shutdown_distributed
from megatron_sc2.parallel.engine import ParallelModel, build_mesh
from megatron_sc2.parallel.layout import ParallelLayout


def main() -> int:
    torch.set_num_threads(1)
    init_distributed(timeout_minutes=0.5, device="cpu")
    rank = torch.distributed.get_rank()
    cfg = ModelConfig(vocab_size=128, hidden_size=32, ffn_hidden_size=64, num_layers=2,
                      num_attention_heads=4, num_query_groups=2, max_position_embeddings=64,
                      sliding_window=8, rope_theta=10000.0).validate()
    layout = ParallelLayout(tp=2, global_batch_size=2).validate(cfg, 16)
    torch.manual_seed(0)
    pm = ParallelModel.build(cfg, layout, build_mesh(layout))
    tokens = torch.randint(0, 128, (2, 17))
    for step in range(100):
        if step == 2 and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        pm.forward_backward(tokens[:, :-1], tokens[:, 1:])
        print(f"rank {rank} step {step}", flush=True)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
