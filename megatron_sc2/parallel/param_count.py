"""Per-rank parameter counts of a layout, found by actually building each rank's shard on the
meta device (no memory, no peers): a fake process group stands in for the world, so the
same code path that shards a real run decides what each rank holds."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sc2.config import ModelConfig
from megatron_sc2.model.starcoder2 import StarCoder2
from megatron_sc2.parallel.layout import ParallelLayout
from megatron_sc2.parallel.tensor_parallel import local_numel


def parameter_counts_per_rank(cfg: ModelConfig, layout: ParallelLayout) -> list[int]:
    """Parameters held by each global rank (a tied weight counted once per rank holding it).
    Must run outside an initialized process group; data parallelism is ignored (FSDP shards
    parameters evenly over dp on top of these counts)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    from megatron_sc2.parallel.engine import Engine, build_mesh

    if dist.is_initialized():
        raise RuntimeError("parameter_counts_per_rank needs no process group to be initialized")
    layout = ParallelLayout(tp=layout.tp, pp=layout.pp, dp=1,
                            micro_batch_size=1, global_batch_size=max(layout.pp, 1),
                            sequence_parallel=layout.sequence_parallel,
                            virtual_stages=layout.virtual_stages)
    layout.validate(cfg)
    counts = []
    for rank in range(layout.world_size):
        dist.init_process_group("fake", rank=rank, world_size=layout.world_size, store=FakeStore())
        try:
            mesh = build_mesh(layout)
            with torch.device("meta"):
                model = StarCoder2(cfg)
            pm = Engine.build(cfg, layout, mesh, model=model, device=torch.device("cpu"))
            counts.append(sum(local_numel(p) for p in pm.parameters()))
            del pm, model, mesh
        finally:
            dist.destroy_process_group()
    return counts
