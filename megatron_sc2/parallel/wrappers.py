"""What the engine wraps transformer blocks in besides parallelism: torch.compile, and FSDP's
mixed-precision policy.

Compilation is per block, as torchtitan does: every block has the same code, so one compiled
graph serves all of them (a compile time of one block, not of the model), block boundaries stay
where activation recomputation, FSDP and pipeline stages put theirs, and `nn.Module.compile`
keeps parameter names (no `_orig_mod.` in state dicts or checkpoints).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def compile_blocks(blocks: Iterable[nn.Module], fullgraph: bool = True) -> None:
    """torch.compile each block in place. fullgraph (the default): a graph break in a block is
    a bug (our attention and linear layers are torch.library operators, megatron_sc2/ops/).
    Context parallelism passes fullgraph=False: its halo exchange (point-to-point sends inside
    an autograd Function) runs eagerly between the compiled graphs before and after it."""
    for block in blocks:
        block.compile(fullgraph=fullgraph)


def fsdp_mixed_precision(bf16: bool):
    """FSDP2's policy: under --bf16 parameters are all-gathered in bf16 (half the traffic,
    and what autocast would cast them to anyway) and gradients reduced in fp32; the sharded
    parameters and the optimizer state stay fp32. Without --bf16 everything stays fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
