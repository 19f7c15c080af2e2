"""Context parallelism (CP): each sample's sequence split into C contiguous chunks, one per CP rank,
with attention exchanging only the sliding window's halo.

A rank holding positions [r*L, (r+1)*L) needs, for a window w, the keys and values of the w - 1
positions before its chunk (fewer near the start of the sequence): its halo. It receives them
point to point from as many preceding CP ranks as the window spans (one when w - 1 <= L), and in
backward sends the halo's dK/dV back to their owners, which add them to their own. Transformer
Engine instead all-gathers the whole K/V for sliding windows; at 16k, w 4096, CP 4 a rank here
receives 4,095 positions from one neighbour instead of 12,288 from three.

Without a window the halo is everything before the chunk: the same point-to-point exchange then
sends each rank's whole chunk to every later rank (an all-gather that skips the half of the
blocks causality never reads); `apply_context_parallel` logs which exchange a run uses.

Attention itself is our kernel (megatron_sc2.ops) with the chunk's L queries against the h + L
keys [halo, chunk]: the kernel takes fewer queries than keys, the queries being the last
positions, so local query t sits at key position h + t (absolute r*L + t) and sees exactly the
keys the full-sequence call would give it (window, causality and document ids are all relative
to that position). No query rows are padded (the C++ kernel and both CUDA families take the
offset), so a rank does attention work for its own L queries only.

Applied from outside like tensor parallelism: `apply_context_parallel` sets each attention
module's `core_attention`; the model file stays free of parallelism. Rotary positions are the
absolute (or per-document) position ids of the chunk, computed before K is exchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_sc2.ops import sliding_window_attention

log = logging.getLogger(__name__)


@dataclass
class ExchangeCounter:
    """Bytes this rank sent in CP exchanges (tests and bench/cp_halo.py read it)."""

    kv_forward: int = 0
    kv_backward: int = 0
    ids: int = 0

    def reset(self) -> None:
        self.kv_forward = self.kv_backward = self.ids = 0

    @property
    def total(self) -> int:
        return self.kv_forward + self.kv_backward + self.ids


BYTES_SENT = ExchangeCounter()


def halo_length(rank: int, chunk: int, window: Optional[int]) -> int:
    """Positions before rank `rank`'s chunk that its queries can see: min(w - 1, rank * chunk)."""
    before = rank * chunk
    return before if window is None else min(window - 1, before)


def halo_plan(rank: int, size: int, chunk: int, window: Optional[int]
              ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(sends, recvs) of one CP rank. sends: (dst, first local row, rows) of this rank's chunk
    that dst's halo holds; recvs: (src, first halo row, rows) filled from src, in halo order."""
    sends, recvs = [], []
    for dst in range(rank + 1, size):
        lo = dst * chunk - halo_length(dst, chunk, window)
        a, b = max(lo, rank * chunk), min(dst * chunk, (rank + 1) * chunk)
        if b > a:
            sends.append((dst, a - rank * chunk, b - a))
    h = halo_length(rank, chunk, window)
    lo = rank * chunk - h
    for src in range(rank):
        a, b = max(lo, src * chunk), min(rank * chunk, (src + 1) * chunk)
        if b > a:
            recvs.append((src, a - lo, b - a))
    return sends, recvs


def halo_volume_bytes(seq: int, cp: int, window: Optional[int], batch: int, kv_heads: int,
                      head_dim: int, layers: int, elem_bytes: int, backward: bool = True) -> int:
    """Analytical K+V bytes the halo exchange moves per (micro-)batch over all CP ranks of one
    group: sum over ranks of halo length x batch x kv heads x head dim x 2 (K and V) x layers,
    twice with backward (the dK/dV return). Document ids are counted separately."""
    chunk = seq // cp
    rows = sum(halo_length(r, chunk, window) for r in range(cp))
    return rows * batch * kv_heads * head_dim * 2 * elem_bytes * layers * (2 if backward else 1)


def allgather_volume_bytes(seq: int, cp: int, batch: int, kv_heads: int, head_dim: int,
                           layers: int, elem_bytes: int, backward: bool = True) -> int:
    """What an all-gather of K/V (Transformer Engine's CP for sliding windows) moves per
    (micro-)batch over one CP group: each rank receives the other C - 1 chunks' K and V, and
    backward reduce-scatters as much dK/dV back."""
    chunk = seq // cp
    rows = cp * (cp - 1) * chunk
    return rows * batch * kv_heads * head_dim * 2 * elem_bytes * layers * (2 if backward else 1)


def _exchange(sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]],
              group: dist.ProcessGroup) -> None:
    """Post every send and receive at once (peers are group ranks) and wait for them all."""
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group) for peer, t in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group)
            for peer, t in recvs]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class _HaloKV(torch.autograd.Function):
    """(k, v) of this chunk -> (k, v) of [halo, chunk]; backward returns the halo's gradients to
    their owners and adds the ones received to this chunk's."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, plan, group):
        sends, recvs = plan
        kv = torch.cat([k, v], dim=-1)  # (b, L, kvh, 2d): one message per peer
        b, _, kvh, d2 = kv.shape
        h = sum(n for _, _, n in recvs)
        halo = kv.new_empty((b, h, kvh, d2))
        out_msgs = [(dst, kv[:, a:a + n].contiguous()) for dst, a, n in sends]
        in_msgs = [(src, kv.new_empty((b, n, kvh, d2))) for src, _, n in recvs]
        _exchange(out_msgs, in_msgs, group)
        BYTES_SENT.kv_forward += sum(t.numel() * t.element_size() for _, t in out_msgs)
        for (_, a, n), (_, t) in zip(recvs, in_msgs):
            halo[:, a:a + n] = t
        ctx.plan, ctx.group, ctx.h, ctx.d = plan, group, h, k.shape[-1]
        full = torch.cat([halo, kv], dim=1)
        return full[..., :ctx.d].contiguous(), full[..., ctx.d:].contiguous()

    @staticmethod
    def backward(ctx, dk: torch.Tensor, dv: torch.Tensor):
        sends, recvs = ctx.plan
        h = ctx.h
        dkv = torch.cat([dk, dv], dim=-1)
        local = dkv[:, h:].clone()
        out_msgs = [(src, dkv[:, a:a + n].contiguous()) for src, a, n in recvs]
        in_msgs = [(dst, dkv.new_empty((dkv.shape[0], n) + dkv.shape[2:])) for dst, _, n in sends]
        _exchange(out_msgs, in_msgs, ctx.group)
        BYTES_SENT.kv_backward += sum(t.numel() * t.element_size() for _, t in out_msgs)
        for (_, a, n), (_, t) in zip(sends, in_msgs):
            local[:, a:a + n] += t
        return local[..., :ctx.d], local[..., ctx.d:], None, None


def _halo_ids(ids: torch.Tensor, plan, group: dist.ProcessGroup) -> torch.Tensor:
    """Document ids of [halo, chunk] (no gradient)."""
    sends, recvs = plan
    out_msgs = [(dst, ids[:, a:a + n].contiguous()) for dst, a, n in sends]
    in_msgs = [(src, ids.new_empty((ids.shape[0], n))) for src, _, n in recvs]
    _exchange(out_msgs, in_msgs, group)
    BYTES_SENT.ids += sum(t.numel() * t.element_size() for _, t in out_msgs)
    return torch.cat([t for _, t in in_msgs] + [ids], dim=1)


@dataclass(eq=False)
class HaloAttention:
    """The attention of one CP rank; one instance serves every layer of the rank (it keeps the
    halo document ids of the current micro-batch so they cross once, not once per layer)."""

    group: dist.ProcessGroup
    rank: int
    size: int
    _ids_key: Optional[torch.Tensor] = field(default=None, repr=False)
    _ids_full: Optional[torch.Tensor] = field(default=None, repr=False)

    # Under --compile the exchange is not traced: a compiled block breaks its graph here and
    # runs the exchange and the attention eagerly (wrappers.compile_blocks, fullgraph=False).
    @torch.compiler.disable
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 window: Optional[int] = None, softmax_scale: Optional[float] = None,
                 document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        chunk = q.shape[1]
        plan = halo_plan(self.rank, self.size, chunk, window)
        kf, vf = _HaloKV.apply(k, v, plan, self.group)
        docs = None
        if document_ids is not None:
            if self._ids_key is not document_ids:
                self._ids_key = document_ids
                self._ids_full = _halo_ids(document_ids, plan, self.group)
            docs = self._ids_full
        return attention_after_halo(q, kf, vf, window, softmax_scale, docs)


def attention_after_halo(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         window: Optional[int] = None, softmax_scale: Optional[float] = None,
                         document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of the chunk's queries q (b, L, ...) over keys k/v (b, h + L, ...) = [halo,
    chunk], document_ids (b, h + L) or None: the queries are the last L key positions."""
    return sliding_window_attention(q, k, v, window=window, softmax_scale=softmax_scale,
                                    document_ids=document_ids)


def apply_context_parallel(module: nn.Module, cp_mesh, window: Optional[int]) -> HaloAttention:
    """Make every attention layer of `module` (a StarCoder2 or a stage of it) exchange its halo
    over `cp_mesh`; returns the shared HaloAttention."""
    attn = HaloAttention(cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size())
    for layer in module.layers.values():
        layer.self_attn.core_attention = attn
    log.info("context parallel x%d: %s", attn.size, exchange_description(window))
    return attn


def exchange_description(window: Optional[int]) -> str:
    """What the exchange moves, for the run's log (the trainer prints it at start)."""
    if window is None:
        return ("no sliding window: the halo is everything before a chunk, so each chunk's K/V "
                "go point to point to every later rank (an all-gather without the blocks "
                "causality never reads)")
    return (f"halo exchange: each rank receives the K/V of the (up to) {window - 1} positions "
            f"before its chunk (window {window}) point to point, and returns their dK/dV")


def sequence_chunk(t: Optional[torch.Tensor], rank: int, size: int) -> Optional[torch.Tensor]:
    """This CP rank's contiguous chunk of a (batch, seq, ...) tensor."""
    if t is None or size == 1:
        return t
    n = t.shape[1] // size
    return t[:, rank * n:(rank + 1) * n]
