"""Megatron's tensor/sequence-parallel split of StarCoder2, as DTensor plans.

Column split: q/k/v projections and c_fc (each rank holds a slice of heads / ffn channels);
row split: o_proj and c_proj (partial sums reduced, or reduce-scattered along the sequence
with --sequence-parallel); vocabulary split: embedding and lm_head (the loss is computed on
the vocabulary shards, see cross_entropy.py). With sequence parallelism the LayerNorms and
the residual stream hold a slice of the sequence.

When TP exceeds the kv heads (StarCoder2-3B at TP4/8, 15B at TP8) k/v projections are
replicated: each rank computes only the kv head its query heads use, and the partial
gradients of the replicated weights are summed over the tensor-parallel group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                               RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from megatron_sc2.config import ModelConfig


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; sums the gradient over a process group in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ReplicatedKVProjection(nn.Module):
    """A k or v projection whose weight is replicated over the tensor-parallel ranks because
    they outnumber the kv heads. Each rank projects only onto the kv head that serves its
    query heads. Parameter names equal nn.Linear's, so checkpoints see no difference."""

    def __init__(self, linear: nn.Linear, head_dim: int, kv_head: int, group: dist.ProcessGroup):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.head_dim = head_dim
        self.kv_head = kv_head
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, DTensor):
            # This rank's use of x is one term of the sum over ranks: its gradient is partial.
            x = x.to_local(grad_placements=[Partial()])
        rows = slice(self.kv_head * self.head_dim, (self.kv_head + 1) * self.head_dim)
        w = _AllReduceGrad.apply(self.weight, self.group)[rows]
        b = _AllReduceGrad.apply(self.bias, self.group)[rows] if self.bias is not None else None
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"kv_head={self.kv_head}, head_dim={self.head_dim}, replicated"


def kv_head_for_rank(tp_rank: int, tp: int, num_kv_heads: int) -> int:
    """The kv head serving the query heads of a tensor-parallel rank when tp > kv heads."""
    return tp_rank // (tp // num_kv_heads)


def apply_tensor_parallel(module: nn.Module, cfg: ModelConfig, tp_mesh: DeviceMesh,
                          sequence_parallel: bool) -> None:
    """Shard, in place, the parts of a StarCoder2 (or a pipeline stage of it) over `tp_mesh`.
    `module` has the model's attribute names: embed_tokens, layers, norm, lm_head (any may be
    None). Tied embedding/lm_head weights stay tied (both are vocabulary-sharded the same way)."""
    tp = tp_mesh.size()
    if tp == 1:
        return
    sp = sequence_parallel
    residual = Shard(1) if sp else Replicate()
    tied = (module.embed_tokens is not None and module.lm_head is not None
            and module.lm_head.weight is module.embed_tokens.weight)

    if module.embed_tokens is not None:
        parallelize_module(module.embed_tokens, tp_mesh,
                           RowwiseParallel(input_layouts=Replicate(), output_layouts=residual))
    kv_replicated = tp > cfg.num_query_groups
    for layer in module.layers.values():
        plan = {
            "self_attn": PrepareModuleInput(
                input_layouts=(residual, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None)),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=residual),
            "mlp": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
            "mlp.c_fc": ColwiseParallel(),
            "mlp.c_proj": RowwiseParallel(output_layouts=residual),
        }
        if sp:
            plan["input_layernorm"] = SequenceParallel(use_local_output=True)
            plan["post_attention_layernorm"] = SequenceParallel(use_local_output=True)
        if not kv_replicated:
            plan["self_attn.k_proj"] = ColwiseParallel()
            plan["self_attn.v_proj"] = ColwiseParallel()
        parallelize_module(layer, tp_mesh, plan)
        if kv_replicated:
            g = kv_head_for_rank(tp_mesh.get_local_rank(), tp, cfg.num_query_groups)
            attn = layer.self_attn
            attn.k_proj = ReplicatedKVProjection(attn.k_proj, cfg.head_dim, g, tp_mesh.get_group())
            attn.v_proj = ReplicatedKVProjection(attn.v_proj, cfg.head_dim, g, tp_mesh.get_group())
    if module.norm is not None and sp:
        parallelize_module(module.norm, tp_mesh, SequenceParallel(use_local_output=True))
    if module.lm_head is not None:
        parallelize_module(module.lm_head, tp_mesh,
                           ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1)))
        if tied:
            module.lm_head.weight = module.embed_tokens.weight


def vocab_range(vocab_size: int, tp_rank: int, tp: int) -> tuple[int, int]:
    """The [start, end) vocabulary ids held by a tensor-parallel rank."""
    per = vocab_size // tp
    return tp_rank * per, (tp_rank + 1) * per


def local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()
