"""One rank's memory over a training step as PyTorch itself accounts it, without the memory.

The rank's real shard is built by the engine (`Engine.build`, a fake process group standing
in for the world, as parallel/param_count.py does) on fake tensors (`FakeTensorMode`: shapes and
dtypes, no storage), then one step runs under `torch.distributed._tools.mem_tracker.MemTracker`,
which records the bytes of every live parameter, gradient, optimizer state, activation and
temporary. This is the oracle the planner's memory model (planning/planner.py) is checked against.

What is emulated, and why:
- The compiled attention kernels cannot run on fake tensors; a stand-in with the CUDA kernel's
  outputs and saved tensors (q, k, v, o, fp32 log-sum-exp, int32 key bounds; fp32 dK/dV in
  backward, ops/attention.py) takes their place.
- A pipeline schedule needs its peers, so a stage is driven by hand in 1F1B's order: the first
  stage runs `pp` micro-batches forward before the first backward (the most it ever holds), the
  last stage one at a time through the head and the loss; under the interleaved schedule the
  first rank runs its warm-up's chunk forwards before the first backward. The schedules' own
  small buffers (P2P receive buffers) are not counted.
- Fake tensors exist only on the CPU here, so autocast follows the CPU's op lists (LayerNorm
  stays in bf16; CUDA's autocast runs it in fp32): the planner's `cuda_autocast=False` variant is
  what this validates.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_sc2.config import ModelConfig
from megatron_sc2.parallel.layout import ParallelLayout
from megatron_sc2.planning.planner import GIB


@dataclass(frozen=True)
class TracedMemory:
    """Peak bytes of one rank over the traced steps, by what the tracker says they hold."""

    peak: int
    params: int
    grads: int
    optimizer: int
    activations: int
    temporaries: int

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in dataclasses.asdict(self).items()}


class _KernelStandIn(torch.autograd.Function):
    """Same outputs and saved tensors as ops/attention.py's CUDA kernel, no computation."""

    @staticmethod
    def forward(ctx, q, k, v):
        b, s, h, _ = q.shape
        o = torch.empty_like(q)
        lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
        lo = torch.empty((b, s), dtype=torch.int32, device=q.device)
        ctx.save_for_backward(q, k, v, o, lse, lo)
        return o

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _, _, _ = ctx.saved_tensors
        dk32 = torch.empty(k.shape, dtype=torch.float32, device=k.device)
        dv32 = torch.empty(v.shape, dtype=torch.float32, device=v.device)
        return torch.empty_like(q), dk32.to(k.dtype), dv32.to(v.dtype)


def _attention_stand_in(q, k, v, window=None, softmax_scale=None, document_ids=None):
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.autocast(q.device.type, enabled=False):
        return _KernelStandIn.apply(q.contiguous(), k.contiguous(), v.contiguous())


@contextlib.contextmanager
def _fake_attention() -> Iterator[None]:
    from megatron_sc2.model import starcoder2

    saved = starcoder2.sliding_window_attention
    starcoder2.sliding_window_attention = _attention_stand_in
    try:
        yield
    finally:
        starcoder2.sliding_window_attention = saved


def _tracker():
    """MemTracker that keeps only its peak across repeated calls of a root module (micro-batches,
    steps); its per-module statistics, which refuse such calls, are not used here."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs):
            if not self._mod_tracker.is_bw and module in self.memory_tracking:
                parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
                if parents == {"Global"}:
                    del self.memory_tracking[module]
            return super()._pre_fw_hook(module, inputs)

    return PeakTracker()


def trace_step_memory(cfg: ModelConfig, layout: ParallelLayout, seq_length: int,
                      stage: str = "first", bf16: bool = True, steps: int = 2) -> TracedMemory:
    """Peak memory of global rank 0's position in `layout` (the first pipeline stage) or, with
    stage="last", of the last stage, over `steps` optimizer steps of AdamW (the second step has the
    optimizer state). Must run outside an initialized process group."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    from megatron_sc2.config import TrainConfig
    from megatron_sc2.model.starcoder2 import StarCoder2
    from megatron_sc2.parallel.engine import Engine, build_mesh
    from megatron_sc2.training.optimizer import build_optimizer

    if dist.is_initialized():
        raise RuntimeError("trace_step_memory needs no process group to be initialized")
    if layout.virtual_stages != 1 and stage != "first":
        raise ValueError("the interleaved schedule is traced on the first pipeline rank only")
    layout.validate(cfg, seq_length)
    rank = 0
    if stage == "last" and layout.pp > 1:
        rank = (layout.pp - 1) * layout.dp * layout.tp
    dist.init_process_group("fake", rank=rank, world_size=layout.world_size, store=FakeStore())
    cpu = torch.device("cpu")
    try:
        mesh = build_mesh(layout)
        for dim in ("pp", "dp", "tp"):  # sub-meshes made now, not on fake tensors
            mesh[dim].get_group()
            mesh[dim].get_local_rank()
        with torch.device("meta"):
            model = StarCoder2(cfg)
        # Built on meta outside fake mode (the mesh's own bookkeeping needs real tensors), then
        # given fake storage: FSDP2's meta-device initialization path.
        pm = Engine.build(cfg, layout, mesh, model=model, device=cpu)
        del model
        with FakeTensorMode(allow_non_fake_inputs=True), _fake_attention():
            for chunk in pm.chunks:
                chunk.to_empty(device=cpu)
                if cfg.tie_word_embeddings and chunk.embed_tokens is not None \
                        and chunk.lm_head is not None:
                    chunk.lm_head.weight = chunk.embed_tokens.weight
            opt = build_optimizer([pm.rank_model], TrainConfig())
            tracker = _tracker()
            tracker.track_external(pm.rank_model, opt)
            mbs, seq = layout.micro_batch_size, seq_length
            local = layout.local_batch_size
            tokens = torch.randint(0, cfg.vocab_size, (local, seq))
            with tracker:
                for _ in range(steps):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        if layout.pp == 1:
                            pm.forward_backward(tokens, tokens)
                        else:
                            _stage_step(pm, layout, cfg, mbs, seq)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            snap = tracker.get_tracker_snapshot("peak")[cpu]
            del pm, opt, tracker
    finally:
        dist.destroy_process_group()
        _forget_groups()
    by = {str(k).split(".")[-1]: int(v) for k, v in snap.items()}
    return TracedMemory(peak=by["Total"], params=by.get("PARAM", 0), grads=by.get("GRAD", 0),
                        optimizer=by.get("OPT", 0), activations=by.get("ACT", 0),
                        temporaries=by.get("TEMP", 0))


def _forget_groups() -> None:
    """DTensor caches sharding decisions and redistribution plans by mesh, and a mesh over a new
    fake world compares equal to the last one: drop what names destroyed process groups."""
    from torch.distributed.tensor import DTensor, _redistribute

    clear = getattr(_redistribute, "clear_redistribute_planner_cache", None)
    if clear is not None:
        clear()
    prop = DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding
    cache = getattr(prop, "cache", None)
    if cache is not None and hasattr(cache, "cache_clear"):
        cache.cache_clear()


def _interleaved_first_rank_step(pm, layout: ParallelLayout, cfg: ModelConfig, mbs: int,
                                 seq: int) -> None:
    """The first pipeline rank under the interleaved schedule: its warm-up runs
    (v - 1) x pp + 2 (pp - 1) chunk forwards, and one more, before the first backward (torch's
    ScheduleInterleaved1F1B, as Megatron's), chunk (k // pp) % v at the k-th forward; then every
    held forward is taken back, the most recent first, and the rest of the step runs one forward
    and one backward at a time."""
    pp, v, n_mb = layout.pp, layout.virtual_stages, layout.num_microbatches
    shards = layout.tp if layout.sequence_parallel else 1
    total = n_mb * v
    held: list[torch.Tensor] = []

    pos = _positions(mbs, seq)

    def forward(k: int) -> torch.Tensor:
        chunk = pm.chunks[(k // pp) % v]
        if chunk.embed_tokens is not None:
            return chunk(torch.randint(0, cfg.vocab_size, (mbs, seq)), pos)
        h = torch.empty((mbs, seq // shards, cfg.hidden_size), requires_grad=True)
        return chunk(h, pos)

    warmup = min((v - 1) * pp + 2 * (pp - 1) + 1, total)
    for k in range(warmup):
        held.append(forward(k))
    for k in range(warmup, total):
        out = held.pop()
        out.backward(torch.empty_like(out))
        held.append(forward(k))
    while held:
        out = held.pop()
        out.backward(torch.empty_like(out))


def _positions(mbs: int, seq: int) -> torch.Tensor:
    """The global positions a stage rotates by (the engine always passes them: a stage under
    sequence parallelism holds a shard of the sequence)."""
    return torch.arange(seq).unsqueeze(0).expand(mbs, seq)


def _stage_step(pm, layout: ParallelLayout, cfg: ModelConfig, mbs: int, seq: int) -> None:
    """One step of this pipeline stage in 1F1B's order, without peers (see the module notes)."""
    if layout.virtual_stages > 1:
        return _interleaved_first_rank_step(pm, layout, cfg, mbs, seq)
    chunk = pm.chunks[0]
    n_mb = layout.num_microbatches
    shards = layout.tp if layout.sequence_parallel else 1
    pos = _positions(mbs, seq)
    if chunk.embed_tokens is not None:
        in_flight = min(layout.pp, n_mb)
        outs = [chunk(torch.randint(0, cfg.vocab_size, (mbs, seq)), pos) for _ in range(in_flight)]
        for i in range(n_mb):
            out = outs.pop(0)
            out.backward(torch.empty_like(out))
            if i + in_flight < n_mb:
                outs.append(chunk(torch.randint(0, cfg.vocab_size, (mbs, seq)), pos))
        return
    total = torch.tensor(float(mbs * seq * n_mb))
    loss_fn = pm._loss_fn(total)
    for _ in range(n_mb):
        h = torch.empty((mbs, seq // shards, cfg.hidden_size), requires_grad=True)
        target = torch.zeros((mbs, seq, 2), dtype=torch.int64)
        out = chunk(h, pos)
        loss = loss_fn(out, target) if chunk.lm_head is not None else out.sum()
        loss.backward()


def trace_layers(cfg: ModelConfig, layers: int) -> ModelConfig:
    """The same shapes with fewer layers (memory per layer is linear in the layer count)."""
    return dataclasses.replace(cfg, num_layers=layers)


def trace_in_subprocess(cfg: ModelConfig, layout: ParallelLayout, seq_length: int,
                        stage: str = "first", timeout: float = 300.0) -> TracedMemory:
    """`trace_step_memory` in a fresh interpreter: DTensor keeps per-process state about the
    fake worlds it has seen, and a second trace at another rank can trip over it."""
    import json
    import subprocess
    import sys

    spec = json.dumps({"cfg": cfg.to_dict(), "layout": dataclasses.asdict(layout),
                       "seq": seq_length, "stage": stage})
    code = ("import json, sys\n"
            "from megatron_sc2.planning.memory_trace import _trace_from_json\n"
            "print(json.dumps(_trace_from_json(sys.stdin.read())))\n")
    out = subprocess.run([sys.executable, "-c", code], input=spec, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory trace of {layout.describe()} ({stage} stage) failed: {tail}")
    return TracedMemory(**json.loads(out.stdout.strip().splitlines()[-1]))


def _trace_from_json(text: str) -> dict:
    import json

    spec = json.loads(text)
    cfg = ModelConfig(**spec["cfg"])
    layout = ParallelLayout(**spec["layout"])
    return dataclasses.asdict(trace_step_memory(cfg, layout, spec["seq"], spec["stage"]))
