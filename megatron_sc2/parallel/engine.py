"""The engine: one step path for every layout, the single process included.

`Engine.build(cfg, layout, mesh)` turns a StarCoder2 into this rank's share of the model
(pipeline stages = the model with layers deleted, tensor/sequence-parallel shards, FSDP2
data-parallel shards with sharded optimizer state, activation recomputation); with tp = pp =
dp = 1 and no mesh it is the plain model in one process. The engine owns what a step computes:
`train_step(batch)` runs this rank's micro-batches forward and backward (loss = masked token
loss over the loss tokens of the whole global batch), then the global grad norm and clipping;
`evaluate(batch)` is the same call without backward. Position and document ids go wherever the
tokens go. Results stay on the device (no host synchronisation inside a step).

Context parallelism (cp > 1): the engine cuts each sample's tokens, labels, loss mask, position
ids and document ids into cp contiguous chunks and runs this rank's chunk (position ids are made
absolute before the cut); attention exchanges the halo (context_parallel.py); the loss divides
by the loss tokens of the whole sequence and its per-chunk sums are added over CP. FSDP shards
parameters, gradients and optimizer state over data x context ranks (as Megatron's distributed
optimizer does), so its gradient reduction also sums the CP ranks' shares.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from megatron_sc2.config import ModelConfig
from megatron_sc2.model.starcoder2 import StarCoder2
from megatron_sc2.parallel.context_parallel import apply_context_parallel, sequence_chunk
from megatron_sc2.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_sc2.parallel.layout import ParallelLayout, split_layers
from megatron_sc2.parallel.recompute import apply_recompute
from megatron_sc2.parallel.stage import RankModel, keep_layers
from megatron_sc2.parallel.tensor_parallel import apply_tensor_parallel, vocab_range

Batch = dict[str, Optional[torch.Tensor]]


@dataclass
class Engine:
    cfg: ModelConfig
    layout: ParallelLayout
    mesh: Optional[DeviceMesh]  # None in one process
    chunks: list[StarCoder2]
    chunk_ids: list[int]
    rank_model: nn.Module
    device: torch.device
    embedding_group: Optional[dist.ProcessGroup] = None
    bf16: bool = False
    _schedule: object = None
    _stages: list = field(default_factory=list)
    _loss_holder: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- construction
    @classmethod
    def build(cls, cfg: ModelConfig, layout: ParallelLayout, mesh: Optional[DeviceMesh],
              model: Optional[StarCoder2] = None, device: Optional[torch.device] = None,
              param_dtype: Optional[torch.dtype] = None,
              init_seed: Optional[int] = None, bf16: bool = False,
              compile: bool = False) -> "Engine":
        """`model`: a full StarCoder2 (the same weights on every rank, e.g. built from one
        seed), or one on the meta device: then, with `init_seed`, each rank allocates and
        initializes only its shards (parallel/init.py); without it the shards stay on meta
        (for counting). Built here from `cfg` if not given. `mesh`: the (pp, dp, cp, tp) mesh, or
        None for one process. `bf16`: forward under bf16 autocast, and FSDP all-gathers the
        parameters in bf16 and reduces gradients in fp32 (`fsdp_mixed_precision`); `compile`:
        torch.compile each transformer block (`compile_blocks`)."""
        if mesh is None and layout.world_size != 1:
            raise ValueError(f"layout {layout.describe()} needs a device mesh")
        device = device or torch.device(mesh.device_type if mesh is not None else "cpu")
        if model is None:
            model = StarCoder2(cfg)
        pp_rank = mesh["pp"].get_local_rank() if mesh is not None else 0
        ranges = split_layers(cfg.num_layers, layout.num_model_chunks)
        chunk_ids = [pp_rank + i * layout.pp for i in range(layout.virtual_stages)]
        last = layout.num_model_chunks - 1
        tied = cfg.tie_word_embeddings
        chunks: list[StarCoder2] = []
        for c in chunk_ids:
            chunk = keep_layers(model, ranges[c], first=c == 0, last=c == last)
            if chunk.lm_head is not None and tied and chunk.embed_tokens is None:
                # The last stage keeps its own copy of the tied embedding; their gradients are
                # summed over the embedding group so the two copies stay equal.
                head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False,
                                 device=model.lm_head.weight.device,
                                 dtype=model.lm_head.weight.dtype)
                with torch.no_grad():
                    if head.weight.device.type != "meta":
                        head.weight.copy_(model.lm_head.weight)
                chunk.lm_head = head
            chunks.append(chunk)
        del model
        if layout.tp > 1:
            for chunk in chunks:
                apply_tensor_parallel(chunk, cfg, mesh["tp"], layout.sequence_parallel)
        if layout.cp > 1:
            for chunk in chunks:
                apply_context_parallel(chunk, mesh["cp"], cfg.sliding_window)
        on_meta = any(p.device.type == "meta" for c in chunks for p in c.parameters())
        if on_meta and init_seed is not None:
            from megatron_sc2.parallel.init import materialize

            for chunk in chunks:
                materialize(chunk, cfg, device, init_seed)
        if not on_meta and (param_dtype is not None or device.type != "cpu"):
            for chunk in chunks:
                chunk.to(device=device, dtype=param_dtype)
        elif param_dtype is not None:
            for chunk in chunks:
                chunk.to(dtype=param_dtype)
        for chunk in chunks:
            # Moving or materializing a module can replace Parameter objects: tie again.
            if tied and chunk.embed_tokens is not None and chunk.lm_head is not None:
                chunk.lm_head.weight = chunk.embed_tokens.weight
        for chunk in chunks:
            apply_recompute(chunk, layout.recompute_granularity)
        if compile:
            from megatron_sc2.parallel.wrappers import compile_blocks

            for chunk in chunks:
                compile_blocks(chunk.layers.values(), fullgraph=layout.cp == 1)
        if layout.dp * layout.cp > 1:
            from torch.distributed.fsdp import fully_shard

            from megatron_sc2.parallel.wrappers import fsdp_mixed_precision

            mp = fsdp_mixed_precision(bf16)
            shard_mesh = mesh["dp"] if layout.cp == 1 else mesh["dp", "cp"]._flatten("dp_cp")
            for chunk in chunks:
                for layer in chunk.layers.values():
                    fully_shard(layer, mesh=shard_mesh, reshard_after_forward=False, mp_policy=mp)
                fully_shard(chunk, mesh=shard_mesh, reshard_after_forward=False, mp_policy=mp)
        embedding_group = _embedding_group(mesh) if (tied and layout.pp > 1) else None
        rank_model = chunks[0] if len(chunks) == 1 else RankModel(chunks)
        return cls(cfg=cfg, layout=layout, mesh=mesh, chunks=chunks, chunk_ids=chunk_ids,
                   rank_model=rank_model, device=device, embedding_group=embedding_group,
                   bf16=bf16)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.rank_model.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.rank_model.named_parameters()

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (which samples it takes)."""
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def holds_tied_copy(self) -> bool:
        """True on the last pipeline stage when lm_head is a copy of the tied embedding."""
        return (self.embedding_group is not None and self.rank_model.lm_head is not None
                and self.rank_model.embed_tokens is None)

    # ---------------------------------------------------------------- one step
    def _group(self, dim: str) -> Optional[dist.ProcessGroup]:
        """The process group of mesh dimension `dim`, None when that dimension has size 1."""
        size = {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp,
                "cp": self.layout.cp}[dim]
        return self.mesh[dim].get_group() if size > 1 else None

    def _loss_fn(self, total_tokens: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Loss of one micro-batch: its masked token-loss sum over the loss tokens of the whole
        global batch, so the micro-batch and data-parallel gradients add up to the global
        mean. `target` packs labels and the 0/1 loss mask as (..., 2). FSDP averages
        gradients over the data-parallel ranks (gloo has no pre-scaled sum), so the loss that
        is back-propagated is multiplied by the data-parallel size; callers divide it out."""
        group = self._group("tp")
        tp_rank = self.mesh["tp"].get_local_rank() if group is not None else 0
        start, _ = vocab_range(self.cfg.vocab_size, tp_rank, self.layout.tp)

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            labels, mask = target[..., 0], target[..., 1]
            ce = vocab_parallel_cross_entropy(logits, labels, start, group)
            return (ce * mask.to(ce.dtype)).sum() / total_tokens * self._dp_scale
        return loss_fn

    @property
    def _dp_scale(self) -> float:
        """FSDP's divisor: it averages gradients over the data x context ranks it shards over."""
        return float(self.layout.dp * self.layout.cp)

    def _autocast(self):
        """bf16 autocast when built with bf16; otherwise leave the caller's autocast as it is
        (autocast(enabled=False) would switch an outer one off)."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @property
    def cp_rank(self) -> int:
        return self.mesh["cp"].get_local_rank() if self.layout.cp > 1 else 0

    def global_tokens(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """Loss tokens of the whole global batch (this rank's mask, of whole sequences, summed
        over data-parallel ranks), at least 1; stays on the device."""
        n = loss_mask.sum(dtype=torch.float32)
        group = self._group("dp")
        if group is not None:
            dist.all_reduce(n, group=group)
        return n.clamp_min(1.0)

    def train_step(self, batch: Batch, clip_grad: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over this rank's share of one global batch (tokens, labels,
        loss_mask, position_ids, document_ids: (local_batch, seq)), then the global grad norm,
        clipped to `clip_grad` if > 0. Returns (global mean loss, grad norm before clipping),
        fp32 scalars on the device; the caller steps the optimizer."""
        loss = self.forward_backward(batch["tokens"], batch["labels"], batch["loss_mask"],
                                     self.global_tokens(batch["loss_mask"]),
                                     batch.get("position_ids"), batch.get("document_ids"))
        norm = self.clip_grad_norm_(clip_grad) if clip_grad > 0 else self.grad_norm()
        return loss, norm

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The training step's loss without backward: (global mean loss, global loss tokens)."""
        tokens = self.global_tokens(batch["loss_mask"])
        loss = self.forward_backward(batch["tokens"], batch["labels"], batch["loss_mask"], tokens,
                                     batch.get("position_ids"), batch.get("document_ids"),
                                     backward=False)
        return loss, tokens

    def forward_backward(self, tokens: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                         loss_mask: Optional[torch.Tensor] = None,
                         total_tokens: Union[float, torch.Tensor, None] = None,
                         position_ids: Optional[torch.Tensor] = None,
                         document_ids: Optional[torch.Tensor] = None,
                         backward: bool = True) -> torch.Tensor:
        """Run this data-parallel rank's share of the global batch (local_batch, seq) as
        micro-batches, accumulating the gradients of sum(token loss x mask) / total_tokens
        (total_tokens: loss tokens of the whole global batch; default every token). Every
        rank returns that global loss (fp32 scalar). backward=False: forward and loss only
        (evaluation; may run under torch.no_grad)."""
        n_mb = self.layout.num_microbatches
        if loss_mask is None:
            loss_mask = torch.ones_like(labels)
        if total_tokens is None:
            total_tokens = float(labels.numel() * self.layout.dp)
        total = torch.as_tensor(total_tokens, dtype=torch.float32, device=self.device)
        loss_fn = self._loss_fn(total)
        target = torch.stack([labels, loss_mask.to(labels.dtype)], dim=-1)
        if position_ids is None:
            # Always explicit: under sequence parallelism a stage sees a shard of the sequence
            # but rotates by the global positions.
            b, s = labels.shape
            position_ids = torch.arange(s, device=labels.device).unsqueeze(0).expand(b, s)
        if self.layout.cp > 1:
            r, c = self.cp_rank, self.layout.cp
            tokens, target, position_ids, document_ids = (
                sequence_chunk(t, r, c) for t in (tokens, target, position_ids, document_ids))
        if self.layout.pp == 1:
            loss_sum = self._local_step(tokens, target, loss_fn, backward, position_ids,
                                        document_ids)
        else:
            side = {name: t for name, t in (("position_ids", position_ids),
                                            ("document_ids", document_ids)) if t is not None}
            with self._autocast():  # the schedule runs forward and backward
                loss_sum = self._pipeline_step(tokens, target, loss_fn, backward, side)
        if backward:
            self._reduce_tied_grads()
        loss_sum = loss_sum / self._dp_scale
        for dim in ("cp", "dp"):
            group = self._group(dim)
            if group is not None:
                dist.all_reduce(loss_sum, group=group)
        return loss_sum


    def _local_step(self, tokens, target, loss_fn, backward: bool, position_ids,
                    document_ids) -> torch.Tensor:
        """No pipeline: the micro-batches one after the other through the one chunk."""
        n_mb = self.layout.num_microbatches
        chunk = self.chunks[0]
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        docs = document_ids.chunk(n_mb) if document_ids is not None else [None] * n_mb
        for i, (t, y, pos) in enumerate(zip(tokens.chunk(n_mb), target.chunk(n_mb),
                                            position_ids.chunk(n_mb))):
            if self.layout.dp * self.layout.cp > 1 and backward:
                # Reduce gradients, and free the gathered parameters, only after the last
                # micro-batch (one all-gather and one reduction per step).
                chunk.set_requires_gradient_sync(i == n_mb - 1)
                chunk.set_reshard_after_backward(i == n_mb - 1)
            with self._autocast():
                loss = loss_fn(chunk(t, pos, docs[i]), y)
            if backward:
                loss.backward()
            loss_sum += loss.detach()
        return loss_sum

    def _pipeline_step(self, tokens, target, loss_fn, backward: bool = True,
                       side: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """One step through the pipeline schedule. `side`: position/document ids of the local
        batch; every rank holds them, and the schedule splits them into micro-batches and hands
        each stage its own as keyword arguments (they never travel between stages)."""
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B,
                                                  ScheduleInterleaved1F1B)

        pp_mesh = self.mesh["pp"]
        self._loss_holder["fn"] = loss_fn
        if self._schedule is None:
            group = pp_mesh.get_group()
            self._stages = [PipelineStage(chunk, c, self.layout.num_model_chunks, self.device,
                                          group=group)
                            for chunk, c in zip(self.chunks, self.chunk_ids)]
            n_mb = self.layout.num_microbatches
            holder = self._loss_holder

            def current_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return holder["fn"](output, target)
            if self.layout.virtual_stages == 1:
                self._schedule = Schedule1F1B(self._stages[0], n_mb, loss_fn=current_loss,
                                              scale_grads=False)
            else:
                self._schedule = ScheduleInterleaved1F1B(self._stages, n_mb, loss_fn=current_loss,
                                                         scale_grads=False)
        first = any(c.embed_tokens is not None for c in self.chunks)
        last = any(c.lm_head is not None for c in self.chunks)
        losses: list[torch.Tensor] = []
        args = (tokens,) if first else ()
        kwargs = {"target": target, "losses": losses} if last else {}
        kwargs.update(side or {})
        if backward:
            self._schedule.step(*args, **kwargs)
        else:
            self._schedule.eval(*args, **kwargs)
        if last:
            loss_sum = torch.stack([l.detach().float() for l in losses]).sum()
        else:
            loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        # The loss lives on the last stage; share it along the pipeline.
        src = dist.get_global_rank(pp_mesh.get_group(), self.layout.pp - 1)
        dist.broadcast(loss_sum, src=src, group=pp_mesh.get_group())
        return loss_sum

    def _reduce_tied_grads(self) -> None:
        if self.embedding_group is None:
            return
        m = self.rank_model
        p = m.embed_tokens.weight if m.embed_tokens is not None else (
            m.lm_head.weight if m.lm_head is not None else None)
        if p is None:
            return
        g = p.grad
        if g is None:
            g = torch.zeros_like(p)
            p.grad = g
        if isinstance(g, DTensor) and g.placements != p.placements:
            # e.g. the vocabulary-parallel embedding's gradient arrives unsharded.
            g = g.redistribute(p.device_mesh, p.placements)
            p.grad = g
        local = g._local_tensor if isinstance(g, DTensor) else g
        dist.all_reduce(local, group=self.embedding_group)

    # ---------------------------------------------------------------- gradients
    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients, each logical parameter counted once."""
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        skip = self.rank_model.lm_head.weight if self.holds_tied_copy else None
        for p in self.rank_model.parameters():
            if p.grad is None or p is skip:
                continue
            g = p.grad
            if isinstance(g, DTensor):
                n = g.float().norm(2).full_tensor()
            else:
                n = g.float().norm(2)
            sq += n * n
        group = self._group("pp")
        if group is not None:
            dist.all_reduce(sq, group=group)
        return sq.sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale gradients so that their global norm is at most max_norm (torch's formula);
        returns the norm before clipping."""
        total = self.grad_norm()
        if max_norm and max_norm > 0:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for p in self.rank_model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return total


def _embedding_group(mesh: DeviceMesh) -> Optional[dist.ProcessGroup]:
    """Groups {first stage, last stage} for each (dp, cp, tp) coordinate; returns this rank's."""
    ranks = mesh.mesh  # (pp, dp, cp, tp) tensor of global ranks
    pp = ranks.shape[0]
    mine = None
    me = dist.get_rank()
    flat_first, flat_last = ranks[0].reshape(-1), ranks[pp - 1].reshape(-1)
    for first, last in zip(flat_first.tolist(), flat_last.tolist()):
        members = sorted({int(first), int(last)})
        group = dist.new_group(members)
        if me in members:
            mine = group
    return mine


# The name tests/dist and older callers use.
ParallelModel = Engine


def build_mesh(layout: ParallelLayout, device_type: str = "cpu") -> Optional[DeviceMesh]:
    """The (pp, dp, cp, tp) device mesh over the initialized world (tp fastest, then cp, as
    Megatron); None in one process without a process group."""
    from torch.distributed.device_mesh import init_device_mesh

    if layout.world_size == 1 and not dist.is_initialized():
        return None
    return init_device_mesh(device_type, (layout.pp, layout.dp, layout.cp, layout.tp),
                            mesh_dim_names=("pp", "dp", "cp", "tp"))
