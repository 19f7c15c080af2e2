"""Cross-entropy on vocabulary-sharded logits, without gathering the full vocabulary.

Each tensor-parallel rank holds logits for a contiguous slice of the vocabulary. The loss
needs three reductions over the group (Megatron's vocab-parallel cross-entropy): the max
logit (for stability), the sum of exponentials, and the target's logit (held by one rank).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                group: dist.ProcessGroup) -> torch.Tensor:
        logits = logits.float()
        local_vocab = logits.shape[-1]
        max_logit = logits.max(dim=-1).values
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - max_logit.unsqueeze(-1)
        local_target = target - vocab_start
        here = (local_target >= 0) & (local_target < local_vocab)
        idx = local_target.clamp(0, local_vocab - 1)
        target_logit = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * here
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        both = torch.stack([target_logit, sum_exp])
        dist.all_reduce(both, group=group)
        target_logit, sum_exp = both[0], both[1]
        loss = sum_exp.log() - target_logit
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, idx, here)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, idx, here = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, idx.unsqueeze(-1), -here.to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                 group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Per-token loss (fp32) of logits (..., vocab/tp) holding ids [vocab_start, vocab_start +
    vocab/tp). With no group (TP1) this is plain cross-entropy."""
    if group is None or dist.get_world_size(group) == 1:
        flat = logits.float().reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, target.reshape(-1), reduction="none").view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, group)
