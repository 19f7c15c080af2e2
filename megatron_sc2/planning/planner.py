"""The layout planner behind `megatron-sc2 plan`: which TP x PP x DP x CP layouts of a model fit a
GPU's memory, what each GPU holds, and how fast each should run.

Memory is modelled from what this stack keeps alive in a step (checked against PyTorch's own
accounting under fake tensors, planning/memory_trace.py): fp32 parameters (bf16 runs use autocast,
which also keeps a bf16 copy of every matmul weight for the step), fp32 gradients and AdamW's two
fp32 moments (FSDP2 shards the three over data-parallel ranks; `reshard_after_forward=False`
keeps the whole stage's parameters gathered through the step, and gradient accumulation keeps
unsharded gradients), the activations autograd saves per layer (counted tensor by tensor from the
model: two fp32 LayerNorm inputs, one bf16 input copy per projection, the attention kernel's
q/k/v/o and fp32 log-sum-exp, the MLP's two ffn-wide bf16 tensors) times the micro-batches a
pipeline stage holds in flight (with each in-flight forward's fp32 input and output), and the
loss's fp32 logits. A step has several peaks and the largest counts: the end of the forward, the
optimizer step, and under FSDP2 x TP the backward of a vocabulary table; the temporaries of the
last two around vocabulary-sharded tables are coefficients measured with the tracker (below).

Time is the model FLOPs (training/flops.py) over the GPUs' bf16 peak at an assumed matmul
efficiency, plus the pipeline bubble and the exposed tensor-parallel and context-parallel traffic
over the GPU's links. It ranks layouts; it is not a measurement.

Context parallelism (CP) is planned with the halo cost model (a rank holding a contiguous chunk
receives the w - 1 preceding positions' K/V from the rank(s) before it), which is what `train
--context-parallel-size` does (parallel/context_parallel.py): a rank's attention saves its L
queries, outputs and log-sum-exp (the kernel takes fewer queries than keys, no padding rows) and
the h + L keys/values [halo, chunk]; its time is the model FLOPs, which count each query's
visible keys once (the kernels compute no padding rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

from megatron_sc2.config import ModelConfig
from megatron_sc2.errors import ConfigError
from megatron_sc2.parallel.layout import ParallelLayout, split_layers
from megatron_sc2.training import flops as flops_mod

GIB = 2 ** 30


@dataclass(frozen=True)
class GPU:
    """A training GPU: memory, dense bf16 peak (data sheet) and the links between GPUs."""

    name: str
    memory_bytes: int
    peak_flops: float
    intra_node_bytes_per_s: float   # per GPU, one direction (NVLink; PCIe for L40S)
    inter_node_bytes_per_s: float   # per GPU, one direction (one InfiniBand/RoCE NIC per GPU)
    gpus_per_node: int = 8


_PEAK = flops_mod._GPU_PEAK_BF16_TFLOPS
GPUS: dict[str, GPU] = {
    "h100-80gb": GPU("H100 SXM 80GB", 81559 * 2 ** 20, _PEAK["H100"] * 1e12, 450e9, 50e9),
    "h200": GPU("H200 SXM 141GB", 143771 * 2 ** 20, _PEAK["H200"] * 1e12, 450e9, 50e9),
    "a100-80gb": GPU("A100 SXM 80GB", 81920 * 2 ** 20, _PEAK["A100"] * 1e12, 300e9, 25e9),
    "a100-40gb": GPU("A100 SXM 40GB", 40960 * 2 ** 20, _PEAK["A100"] * 1e12, 300e9, 25e9),
    "l40s": GPU("L40S 48GB", 46068 * 2 ** 20, _PEAK["L40S"] * 1e12, 32e9, 25e9),
}

# Assumptions of the time model (named here so that the table can say what it rests on).
MATMUL_EFFICIENCY = 0.6        # achieved fraction of the bf16 peak by large GEMMs and the kernel
DP_OVERLAP = 0.9               # fraction of FSDP all-gather/reduce-scatter hidden behind compute
# Memory the allocator cannot use for tensors: CUDA context, NCCL and cuBLAS workspaces, and the
# caching allocator's fragmentation.
RESERVED_BYTES = 3 * GIB
USABLE_FRACTION = 0.92


@dataclass(frozen=True)
class Layout:
    """One candidate: ParallelLayout's sizes (context parallelism included). The planner
    always uses sequence parallelism with TP (it only saves memory)."""

    tp: int
    pp: int
    dp: int
    cp: int
    micro_batch_size: int
    global_batch_size: int
    virtual_stages: int = 1
    recompute: Optional[str] = None
    sequence_parallel: bool = True

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def parallel_layout(self) -> ParallelLayout:
        """The TP x PP x DP part, as the engine sees it (CP ranks are extra data ranks there)."""
        return ParallelLayout(tp=self.tp, pp=self.pp, dp=self.dp,
                              micro_batch_size=self.micro_batch_size,
                              global_batch_size=self.global_batch_size,
                              sequence_parallel=self.sequence_parallel and self.tp > 1,
                              virtual_stages=self.virtual_stages,
                              recompute_granularity=self.recompute)

    def describe(self) -> str:
        sp = " SP" if self.sequence_parallel and self.tp > 1 else ""
        v = f" v{self.virtual_stages}" if self.virtual_stages > 1 else ""
        cp = f" x CP{self.cp}" if self.cp > 1 else ""
        return f"TP{self.tp}{sp} x PP{self.pp}{v} x DP{self.dp}{cp}"


@dataclass(frozen=True)
class Memory:
    """Per-GPU bytes of the fullest rank, by what they hold."""

    params: int
    grads: int
    optimizer: int
    activations: int
    comm_buffers: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.comm_buffers


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: Memory
    step_time_s: float
    mfu: float
    bubble: float            # pipeline bubble as a fraction of the compute time
    comm_s: float            # exposed communication per step
    fits: bool
    seq_length: int

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return (self.layout.global_batch_size * self.seq_length / self.step_time_s
                / self.layout.world_size)


# ----------------------------------------------------------------------------- checks

def check_context_parallel(seq_length: int, cp: int, tp: int, pp: int, world: int) -> None:
    """CP's own rules, naming the flag (they move into parallel/layout.py with CP itself)."""
    if cp <= 0:
        raise ConfigError(f"--context-parallel-size must be positive, got {cp}")
    if seq_length % cp:
        raise ConfigError(f"--context-parallel-size {cp} does not divide --seq-length {seq_length}")
    if tp > 1 and (seq_length // cp) % tp:
        raise ConfigError(f"--context-parallel-size {cp} leaves chunks of {seq_length // cp} "
                          f"tokens, not divisible by --tensor-model-parallel-size {tp} "
                          f"(sequence parallelism splits each chunk)")
    if world % (cp * tp * pp):
        raise ConfigError(f"--context-parallel-size {cp} x --tensor-model-parallel-size {tp} x "
                          f"--pipeline-model-parallel-size {pp} does not divide --gpus {world}")


# ----------------------------------------------------------------------------- parameters

def _layer_params(cfg: ModelConfig, tp: int) -> tuple[int, int]:
    """(parameters of one layer on a TP rank, of which matmul weights and biases)."""
    h, f, d, kv = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim, cfg.num_query_groups
    b = 1 if cfg.use_bias else 0
    kv_dim = kv * d
    q = h * h // tp + b * h // tp
    o = h * h // tp + b * h                       # row split: the bias is replicated
    if tp <= kv:
        k = v = h * kv_dim // tp + b * kv_dim // tp
    else:                                          # replicated kv projections hold everything
        k = v = h * kv_dim + b * kv_dim
    fc = h * f // tp + b * f // tp
    proj = f * h // tp + b * h
    matmul = q + o + k + v + fc + proj
    return matmul + 4 * h, matmul


@dataclass(frozen=True)
class StageShape:
    """What one pipeline rank holds: its layers, and embedding / head / final norm if any."""

    layers: int
    first: bool
    last: bool
    params: int          # parameters on a TP rank of this stage (tied copy included)
    cast_params: int     # those that autocast copies to bf16 for the step
    embed_params: int


def stage_shapes(cfg: ModelConfig, tp: int, pp: int, virtual: int = 1) -> list[StageShape]:
    """One StageShape per pipeline rank (all its virtual chunks together)."""
    chunks = split_layers(cfg.num_layers, pp * virtual)
    per_layer, per_layer_mm = _layer_params(cfg, tp)
    vh = cfg.vocab_size // tp * cfg.hidden_size
    out = []
    for rank in range(pp):
        ids = [rank + i * pp for i in range(virtual)]
        layers = sum(len(chunks[c]) for c in ids)
        first, last = 0 in ids, (pp * virtual - 1) in ids
        params, cast = layers * per_layer, layers * per_layer_mm
        embed = vh if first else 0
        params += embed
        if last:
            params += 2 * cfg.hidden_size
            if not (cfg.tie_word_embeddings and first):
                params += vh            # untied head, or a last stage's copy of the tied one
            cast += vh                  # lm_head's weight is a matmul operand
        out.append(StageShape(layers, first, last, params, cast, embed))
    return out


# ----------------------------------------------------------------------------- activations

def layer_activation_bytes(cfg: ModelConfig, tokens: int, tp: int, sp: bool,
                           recompute: Optional[str], halo: int = 0) -> int:
    """Bytes one layer saves for backward for `tokens` tokens of one micro-batch (bf16 autocast).
    `halo`: extra key/value positions received under context parallelism (all samples'); the
    queries, outputs and log-sum-exp stay at `tokens` (the kernel takes fewer queries than keys)."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    seq_split = tp if (sp and tp > 1) else 1
    heads = cfg.num_attention_heads // tp
    kv_heads = max(cfg.num_query_groups // tp, 1)
    ln_in = 4 * h * tokens // seq_split                 # fp32 residual into a LayerNorm
    if recompute == "full":
        return ln_in                                     # the block's input only
    mlp = ln_in + 2 * h * tokens + 2 * (2 * f // tp) * tokens   # LN2 in, c_fc in, gelu in, c_proj in
    if recompute == "selective":
        return ln_in + mlp                               # attention input; attention recomputed
    qkv_in = 3 * 2 * h * tokens                          # one bf16 copy per projection
    q_o = 2 * (2 * heads * d) * tokens                   # kernel's q and o (bf16)
    kv = 2 * (2 * kv_heads * d) * (tokens + halo)        # kernel's k and v (bf16), with the halo
    lse = 4 * heads * tokens + 4 * tokens                # fp32 log-sum-exp, int32 key bounds
    return ln_in + qkv_in + q_o + kv + lse + mlp


def recompute_peak_bytes(cfg: ModelConfig, tokens: int, tp: int, sp: bool,
                         recompute: Optional[str], halo: int = 0) -> int:
    """Extra bytes while one layer's recomputed activations live during its backward."""
    if recompute is None:
        return 0
    return layer_activation_bytes(cfg, tokens, tp, sp, None, halo) - \
        layer_activation_bytes(cfg, tokens, tp, sp, recompute, halo)


def loss_bytes(cfg: ModelConfig, tokens: int, tp: int) -> int:
    """Peak of the head and loss per logit: one process, in the loss's backward (bf16 logits, the
    saved fp32 log-softmax, its fp32 gradient and that gradient in bf16); vocabulary-parallel, at
    the end of the forward (bf16 logits, fp32 copy, shifted logits, softmax)."""
    v = cfg.vocab_size // tp
    per = 2 + 4 + 4 + 2 if tp == 1 else 2 + 4 + 4 + 4
    return per * v * tokens


def in_flight_microbatches(pp: int, virtual: int, n_mb: int, stage: int) -> float:
    """Micro-batches of all of a pipeline rank's layers held at once. 1F1B: stage s holds
    pp - s. Interleaved (torch's ScheduleInterleaved1F1B, as Megatron's): the warm-up runs
    (v - 1) x pp + 2 (pp - 1 - s) chunk forwards, and one more, before the first backward, each
    holding 1/v of the rank's layers -- (1 + (pp - 1) / (pp x v)) x pp on the first rank when the
    step has enough micro-batches; never more than the step's n_mb x v chunk forwards."""
    if pp == 1:
        return 1.0
    if virtual == 1:
        return float(min(pp - stage, n_mb))
    chunk_forwards = (virtual - 1) * pp + 2 * (pp - 1 - stage) + 1
    return min(chunk_forwards, n_mb * virtual) / virtual


# ----------------------------------------------------------------------------- memory

def estimate_memory(cfg: ModelConfig, layout: Layout, seq_length: int) -> Memory:
    """Per-GPU memory of the fullest rank of `layout` (the max over pipeline stages) in a bf16
    (autocast) run, the recipe's precision; fp32 runs are not modelled."""
    best: Optional[Memory] = None
    for stage, shape in enumerate(stage_shapes(cfg, layout.tp, layout.pp, layout.virtual_stages)):
        m = _stage_memory(cfg, layout, seq_length, stage, shape)
        if best is None or m.total > best.total:
            best = m
    assert best is not None
    return best


def _stage_memory(cfg: ModelConfig, layout: Layout, seq_length: int, stage: int,
                  shape: StageShape) -> Memory:
    """The larger of the two peaks of a step: the end of the forward (activations and the loss
    live) and the optimizer step (gradients and AdamW's temporaries live)."""
    peaks = [_forward_peak(cfg, layout, seq_length, stage, shape),
             _optimizer_peak(cfg, layout, shape)]
    if layout.tp > 1 and layout.dp * layout.cp > 1:
        peaks.append(_table_backward_peak(cfg, layout, seq_length, stage, shape))
    return max(peaks, key=lambda m: m.total)


def _accumulates(layout: Layout) -> bool:
    """Gradients exist during a forward: several micro-batches per step (or a pipeline's 1F1B,
    whose backward passes interleave with later forwards)."""
    return layout.num_microbatches > 1 or layout.pp > 1


def _forward_peak(cfg: ModelConfig, layout: Layout, seq_length: int, stage: int,
                  shape: StageShape) -> Memory:
    tp, cp = layout.tp, layout.cp
    shard = layout.dp * cp                             # FSDP shards over data and context ranks
    p = shape.params
    # fp32 shards at rest plus the stage gathered through the step; autocast's bf16 copies.
    params = 4 * p if shard == 1 else 4 * p // shard + 4 * p
    params += 2 * shape.cast_params
    grads = 4 * p if _accumulates(layout) else 0       # unsharded while micro-batches accumulate
    if grads and shape.first and tp > 1 and _embedding_grad_unsharded(cfg, layout):
        grads += 4 * shape.embed_params * (tp - 1)
    optimizer = 8 * p // shard
    tokens = layout.micro_batch_size * seq_length // cp
    sp = layout.sequence_parallel and tp > 1
    halo = _halo_tokens(cfg, seq_length, cp) * layout.micro_batch_size  # every sample's halo
    per_layer = layer_activation_bytes(cfg, tokens, tp, sp, layout.recompute, halo)
    held = in_flight_microbatches(layout.pp, layout.virtual_stages, layout.num_microbatches, stage)
    acts = int(shape.layers * per_layer * held)
    acts += recompute_peak_bytes(cfg, tokens, tp, sp, layout.recompute, halo)
    seq_split = tp if sp else 1
    # The residual stream (fp32): one live without a pipeline; with one, every forward in flight
    # keeps its chunk's input and output for the backward the schedule runs later.
    residuals = 1 if layout.pp == 1 else 2 * held * layout.virtual_stages
    acts += int(4 * cfg.hidden_size * tokens // seq_split * residuals)
    if shape.last:
        acts += loss_bytes(cfg, tokens, tp)
    comm = 0
    if layout.pp > 1:
        # P2P send/receive buffers of activations and their gradients (bf16).
        comm += 2 * 2 * 2 * cfg.hidden_size * tokens // seq_split
    if cp > 1:
        comm += 2 * 2 * 2 * max(cfg.num_query_groups // tp, 1) * cfg.head_dim * halo
    return Memory(params=params, grads=grads, optimizer=optimizer, activations=acts,
                  comm_buffers=comm)


def _embedding_grad_unsharded(cfg: ModelConfig, layout: Layout) -> bool:
    """The vocabulary-parallel embedding's gradient arrives unsharded (the whole vocabulary)
    unless the tied head's sharded gradient is added to it on the same rank."""
    return not cfg.tie_word_embeddings or layout.pp > 1


# FSDP2 over a TP mesh: in the backward of a vocabulary-sharded table (embedding, lm_head) its
# gradient arrives whole and is copied; full fp32 tables of temporaries at that moment, measured
# with the fake-tensor tracker (bench/plan.py): ~5 at a tied embedding (the head's and the
# embedding's gradients added), ~1.3 at the lm_head of a last pipeline stage.
_FSDP_TP_TIED_EMBEDDING_TABLES = 5.0
_FSDP_TP_HEAD_TABLES = 1.33


def _table_backward_peak(cfg: ModelConfig, layout: Layout, seq_length: int, stage: int,
                         shape: StageShape) -> Memory:
    tp, shard = layout.tp, layout.dp * layout.cp
    p, e = shape.params, shape.embed_params
    table = 4 * cfg.vocab_size * cfg.hidden_size
    cast = 2 * shape.cast_params                       # autocast's copies live through the step
    n_mb = layout.num_microbatches
    if shape.first and shape.last and cfg.tie_word_embeddings:
        # The embedding's backward, the last of the micro-batch: the layers' activations are
        # gone, and after the step's last micro-batch their parameters are resharded.
        params = 4 * p // shard + (4 * e if n_mb == 1 else 4 * p) + cast
        grads = 4 * (p - e) * (1 if n_mb > 1 else 0) + 4 * (p - e) // shard
        temp = int(_FSDP_TP_TIED_EMBEDDING_TABLES * table)
        return Memory(params=params, grads=grads, optimizer=8 * p // shard + temp,
                      activations=0, comm_buffers=0)
    if not shape.last or layout.pp == 1:
        # (Without a pipeline the tracker finds the untied head's backward below the forward's
        # peak.)
        return Memory(0, 0, 0, 0, 0)
    # The lm_head's backward on the last pipeline stage, the first of the micro-batch: every
    # activation is still saved.
    fwd = _forward_peak(cfg, layout, seq_length, stage, shape)
    tokens = layout.micro_batch_size * seq_length // layout.cp
    loss_fwd = loss_bytes(cfg, tokens, tp)
    loss_bwd = (4 + 4 + 2) * cfg.vocab_size // tp * tokens   # saved softmax, its grad, in bf16
    grads = (4 * p if _accumulates(layout) else 0) + table * (tp - 1) // tp
    temp = int(_FSDP_TP_HEAD_TABLES * table)
    return Memory(params=fwd.params, grads=grads, optimizer=fwd.optimizer + temp,
                  activations=fwd.activations - loss_fwd + loss_bwd,
                  comm_buffers=fwd.comm_buffers)


# AdamW's temporaries on a vocabulary-sharded DTensor table (embedding or lm_head) during the
# optimizer step, in full (unsharded) fp32 tables: measured with the fake-tensor tracker
# (3.25-3.5 at TP2/TP4, bench/plan.py); one parameter-sized temporary without TP.
_DTENSOR_ADAMW_TABLES = 3.5


def _optimizer_peak(cfg: ModelConfig, layout: Layout, shape: StageShape) -> Memory:
    tp, shard = layout.tp, layout.dp * layout.cp
    p = shape.params
    params = 4 * p // shard
    grads = 4 * p // shard
    if shape.first and tp > 1 and _embedding_grad_unsharded(cfg, layout):
        grads += 4 * shape.embed_params * (tp - 1) // shard
    table = 4 * cfg.vocab_size * cfg.hidden_size
    if tp > 1 and (shape.first or shape.last):
        temp = int(_DTENSOR_ADAMW_TABLES * table) // shard
    else:
        temp = max(table // tp if (shape.first or shape.last) else 0,
                   4 * cfg.hidden_size * cfg.ffn_hidden_size // tp) // shard
    return Memory(params=params, grads=grads, optimizer=8 * p // shard + temp, activations=0,
                  comm_buffers=0)


def _halo_tokens(cfg: ModelConfig, seq_length: int, cp: int) -> int:
    """K/V positions a CP rank receives: w - 1 before its chunk (everything before it without a
    window; the last rank's share is the largest)."""
    if cp == 1:
        return 0
    chunk = seq_length // cp
    if cfg.sliding_window is None:
        return seq_length - chunk
    return min(cfg.sliding_window - 1, seq_length - chunk)


def halo_bytes_per_layer(cfg: ModelConfig, seq_length: int, cp: int, tp: int,
                         micro_batch_size: int = 1) -> int:
    """Forward K/V bytes (bf16) one CP rank receives per layer and micro-batch."""
    kv_heads = max(cfg.num_query_groups // tp, 1)
    return 2 * 2 * kv_heads * cfg.head_dim * _halo_tokens(cfg, seq_length, cp) * micro_batch_size


# ----------------------------------------------------------------------------- time

def estimate_time(cfg: ModelConfig, layout: Layout, seq_length: int, gpu: GPU) -> tuple[float, float, float]:
    """(step seconds, pipeline bubble fraction, exposed communication seconds)."""
    model_flops = flops_mod.train_flops_per_step(cfg, seq_length, layout.global_batch_size)
    extra = {None: 0.0, "selective": 0.0, "full": 1.0 / 3.0}[layout.recompute]
    fwd = flops_mod.forward_flops_per_sequence(cfg, seq_length)
    if layout.recompute == "selective":
        attn = 4 * flops_mod.attended_keys(seq_length, cfg.sliding_window) * \
            cfg.num_attention_heads * cfg.head_dim * cfg.num_layers
        extra = attn / (3.0 * fwd)
    compute = model_flops * (1.0 + extra) / (layout.world_size * gpu.peak_flops * MATMUL_EFFICIENCY)
    bubble = (layout.pp - 1) / (layout.virtual_stages * layout.num_microbatches) if layout.pp > 1 else 0.0
    tokens = layout.micro_batch_size * seq_length // layout.cp
    n_mb = layout.num_microbatches
    layers_per_rank = math.ceil(cfg.num_layers / layout.pp)
    comm = 0.0
    if layout.tp > 1:
        # Two all-reduces (or all-gather + reduce-scatter pairs) forward and two backward per
        # layer, bf16 activations, ring cost 2 (t - 1) / t of the message, not overlapped.
        bw = gpu.intra_node_bytes_per_s if layout.tp <= gpu.gpus_per_node else gpu.inter_node_bytes_per_s
        msg = 2 * cfg.hidden_size * tokens
        per_layer = 4 * 2 * (layout.tp - 1) / layout.tp * msg / bw
        comm += per_layer * layers_per_rank * n_mb
    if layout.pp > 1:
        # Each model chunk sends its activations forward and receives their gradients, bf16,
        # per micro-batch, between nodes once a stage spans a node; not overlapped.
        bw = gpu.intra_node_bytes_per_s if layout.world_size <= gpu.gpus_per_node \
            else gpu.inter_node_bytes_per_s
        seq_split = layout.tp if (layout.sequence_parallel and layout.tp > 1) else 1
        msg = 2 * cfg.hidden_size * tokens // seq_split
        comm += 2 * msg / bw * layout.virtual_stages * n_mb
    if layout.cp > 1:
        bw = gpu.intra_node_bytes_per_s if layout.tp * layout.cp <= gpu.gpus_per_node \
            else gpu.inter_node_bytes_per_s
        halo = halo_bytes_per_layer(cfg, seq_length, layout.cp, layout.tp, layout.micro_batch_size)
        comm += 2 * halo / bw * layers_per_rank * n_mb   # K/V forward, dK/dV backward
    shard = layout.dp * layout.cp
    if shard > 1:
        bw = gpu.intra_node_bytes_per_s if layout.world_size <= gpu.gpus_per_node \
            else gpu.inter_node_bytes_per_s
        stage_params = max(s.params for s in stage_shapes(cfg, layout.tp, layout.pp,
                                                          layout.virtual_stages))
        # fp32 all-gather of the parameters and reduce-scatter of the gradients, once per step.
        dp_comm = 2 * 4 * stage_params * (shard - 1) / shard / bw
        comm += dp_comm * (1.0 - DP_OVERLAP)
    step = compute * (1.0 + bubble) + comm
    return step, bubble, comm


# ----------------------------------------------------------------------------- search

def usable_bytes(gpu: GPU) -> int:
    return int(gpu.memory_bytes * USABLE_FRACTION) - RESERVED_BYTES


def default_global_batch(seq_length: int) -> int:
    """About four million tokens per step (StarCoder2's 15B run: 1,024 x 4,096)."""
    return max(1, (4 * 1024 * 1024) // seq_length)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: ModelConfig, seq_length: int, gpus: int, global_batch_size: int,
                      gpus_per_node: int = 8, tp: Optional[int] = None, pp: Optional[int] = None,
                      cp: Optional[int] = None) -> Iterator[Layout]:
    """Every layout parallel/layout.py allows (plus CP's rules) on `gpus` GPUs."""
    tps = [tp] if tp else [t for t in (1, 2, 4, 8) if t <= gpus_per_node]
    pps = [pp] if pp else [p for p in _divisors(cfg.num_layers) if p <= 16]
    cps = [cp] if cp else [c for c in (1, 2, 4, 8)]
    for t in tps:
        for p in pps:
            for c in cps:
                if gpus % (t * p * c) or seq_length % c or (t > 1 and (seq_length // c) % t):
                    continue
                d = gpus // (t * p * c)
                for mbs in (1, 2, 4):
                    for v in (1, 2, 4):
                        if v > 1 and (p < 2 or cfg.num_layers % (p * v)):
                            continue
                        for rc in (None, "selective", "full"):
                            lay = Layout(tp=t, pp=p, dp=d, cp=c, micro_batch_size=mbs,
                                         global_batch_size=global_batch_size, virtual_stages=v,
                                         recompute=rc)
                            try:
                                lay.parallel_layout().validate(cfg, seq_length // c)
                            except ConfigError:
                                continue
                            yield lay


def plan(cfg: ModelConfig, seq_length: int, gpus: int, gpu: GPU,
         global_batch_size: Optional[int] = None, tp: Optional[int] = None,
         pp: Optional[int] = None, cp: Optional[int] = None) -> list[Plan]:
    """Every candidate layout with its memory and time, the ones that fit first, fastest first."""
    if gpus <= 0:
        raise ConfigError(f"--gpus must be positive, got {gpus}")
    if seq_length <= 0 or seq_length > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-length {seq_length} must lie in 1..{cfg.max_position_embeddings} "
                          f"(--max-position-embeddings)")
    gbs = global_batch_size or default_global_batch(seq_length)
    if gbs <= 0:
        raise ConfigError(f"--global-batch-size must be positive, got {gbs}")
    if tp is not None:
        ParallelLayout(tp=tp).validate(cfg)     # TP's own rules, naming the flag
        if gpus % tp:
            raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide --gpus {gpus}")
    if pp is not None and (pp <= 0 or pp > cfg.num_layers):
        raise ConfigError(f"--pipeline-model-parallel-size {pp} must lie in 1..{cfg.num_layers} "
                          f"(the layers)")
    if cp is not None:
        check_context_parallel(seq_length, cp, tp or 1, pp or 1, gpus)
    limit = usable_bytes(gpu)
    plans = []
    for lay in candidate_layouts(cfg, seq_length, gpus, gbs, gpu.gpus_per_node, tp, pp, cp):
        mem = estimate_memory(cfg, lay, seq_length)
        step, bubble, comm = estimate_time(cfg, lay, seq_length, gpu)
        model_flops = flops_mod.train_flops_per_step(cfg, seq_length, gbs)
        mfu = model_flops / (step * lay.world_size * gpu.peak_flops)
        plans.append(Plan(lay, mem, step, mfu, bubble, comm, mem.total <= limit, seq_length))
    if not plans:
        raise ConfigError(f"no layout of {gpus} GPUs satisfies the layout rules with "
                          f"--global-batch-size {gbs} (it must divide by micro-batch x data-parallel "
                          f"size, and fill the pipeline)")
    plans.sort(key=lambda pl: (not pl.fits, pl.step_time_s, pl.memory.total))
    return plans


def layout_config(cfg_name: str, cfg: ModelConfig, seq_length: int, layout: Layout,
                  rotary_base: Optional[float] = None) -> dict:
    """The training-config keys (as `megatron-sc2 train --config` reads them) of a layout."""
    out: dict = {"model": cfg_name, "seq_length": seq_length,
                 "tensor_model_parallel_size": layout.tp,
                 "pipeline_model_parallel_size": layout.pp,
                 "sequence_parallel": layout.sequence_parallel and layout.tp > 1,
                 "micro_batch_size": layout.micro_batch_size,
                 "global_batch_size": layout.global_batch_size, "bf16": True}
    if layout.virtual_stages > 1:
        out["num_layers_per_virtual_pipeline_stage"] = (
            cfg.num_layers // (layout.pp * layout.virtual_stages))
    if layout.recompute:
        out["recompute_granularity"] = layout.recompute
    if layout.cp > 1:
        out["context_parallel_size"] = layout.cp
    if rotary_base is not None:
        out["rotary_base"] = rotary_base
    return out
