"""The parallel layout of a run (TP x CP x PP x DP, micro-batching), validated before anything
starts.

Megatron's rank order: tensor-parallel ranks are adjacent (fastest varying), then context
parallel, then data parallel, then pipeline stages. Every check raises a ConfigError that names
the flag at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_sc2.config import ModelConfig
from megatron_sc2.errors import ConfigError


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of each parallel dimension and the micro-batching they imply."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    global_batch_size: int = 1
    sequence_parallel: bool = False
    # Model chunks per pipeline rank (1 = plain 1F1B; >1 = interleaved schedule).
    virtual_stages: int = 1
    recompute_granularity: Optional[str] = None
    # Context parallel: each sample's sequence in cp contiguous chunks (context_parallel.py).
    cp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per data-parallel rank per step (gradient accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def local_batch_size(self) -> int:
        """Sequences one data-parallel rank consumes per step."""
        return self.global_batch_size // self.dp

    @property
    def num_model_chunks(self) -> int:
        return self.pp * self.virtual_stages

    def describe(self) -> str:
        sp = " SP" if self.sequence_parallel and self.tp > 1 else ""
        v = f" v{self.virtual_stages}" if self.virtual_stages > 1 else ""
        cp = f" x CP{self.cp}" if self.cp > 1 else ""
        return f"TP{self.tp}{sp}{cp} x PP{self.pp}{v} x DP{self.dp}"

    def validate(self, model: ModelConfig, seq_length: Optional[int] = None) -> "ParallelLayout":
        """Refuse layouts that cannot work, naming the flag."""
        for name, value in (("--tensor-model-parallel-size", self.tp),
                            ("--pipeline-model-parallel-size", self.pp),
                            ("data-parallel size", self.dp),
                            ("--context-parallel-size", self.cp),
                            ("--micro-batch-size", self.micro_batch_size),
                            ("--global-batch-size", self.global_batch_size)):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        heads, kv = model.num_attention_heads, model.num_query_groups
        if heads % self.tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {self.tp} does not divide the {heads} attention heads")
        if self.tp <= kv and kv % self.tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {self.tp} does not divide the {kv} kv heads "
                f"(--num-query-groups)")
        if self.tp > kv and self.tp % kv:
            raise ConfigError(
                f"--tensor-model-parallel-size {self.tp} exceeds the {kv} kv heads but is not a "
                f"multiple of them, so kv heads cannot be replicated evenly")
        if model.ffn_hidden_size % self.tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {self.tp} does not divide --ffn-hidden-size "
                f"{model.ffn_hidden_size}")
        if model.vocab_size % self.tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {self.tp} does not divide the vocabulary size "
                f"{model.vocab_size} (pad it with --make-vocab-size-divisible-by)")
        if self.cp > 1 and seq_length is not None and seq_length % self.cp:
            raise ConfigError(
                f"--context-parallel-size {self.cp} does not divide --seq-length {seq_length}")
        chunk = seq_length // self.cp if seq_length is not None else None
        if self.sequence_parallel and chunk is not None and self.tp > 1 and chunk % self.tp:
            raise ConfigError(
                f"--sequence-parallel needs --seq-length {seq_length} divisible by "
                f"--tensor-model-parallel-size {self.tp}"
                + (f" x --context-parallel-size {self.cp}" if self.cp > 1 else ""))
        if self.num_model_chunks > model.num_layers:
            raise ConfigError(
                f"{model.num_layers} layers cannot fill {self.pp} pipeline stages x "
                f"{self.virtual_stages} virtual stages (--pipeline-model-parallel-size, "
                f"--num-layers-per-virtual-pipeline-stage)")
        if self.global_batch_size % (self.micro_batch_size * self.dp):
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size {self.dp}")
        if self.pp > 1 and self.num_microbatches < self.pp:
            raise ConfigError(
                f"{self.num_microbatches} micro-batches per step cannot fill "
                f"{self.pp} pipeline stages: raise --global-batch-size to at least "
                f"{self.pp * self.micro_batch_size * self.dp}")
        if self.virtual_stages > 1:
            if self.pp < 2:
                raise ConfigError("--num-layers-per-virtual-pipeline-stage needs "
                                  "--pipeline-model-parallel-size of at least 2")
            if self.num_microbatches % self.pp:
                raise ConfigError(
                    f"the interleaved schedule needs the micro-batches per step "
                    f"({self.num_microbatches}) to be a multiple of "
                    f"--pipeline-model-parallel-size {self.pp}")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ConfigError(f"--recompute-granularity must be full or selective, "
                              f"got {self.recompute_granularity!r}")
        return self


def layout_from_args(cfg: "TrainConfigLike", world_size: int, model: ModelConfig) -> ParallelLayout:
    """Derive the data-parallel size from the world size and validate the whole layout."""
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    cp = getattr(cfg, "context_parallel_size", 1)
    if tp <= 0 or pp <= 0:
        raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size "
                          "must be positive")
    if cp <= 0:
        raise ConfigError(f"--context-parallel-size must be positive, got {cp}")
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}"
            + (f" x --context-parallel-size {cp}" if cp > 1 else ""))
    if cp > 1:
        check_context_parallel_backend()
    dp = world_size // (tp * pp * cp)
    if getattr(cfg, "compile", False) and tp > 1:
        # torch 2.13 on CPU: the compiled backward of a DTensor-sharded block hands a plain
        # tensor to DTensor's redistribute (AttributeError '_local_tensor'); refused until fixed.
        raise ConfigError("--compile is not supported with --tensor-model-parallel-size > 1 yet "
                          "(compiled tensor-parallel blocks fail in backward); drop one of them")
    mbs = cfg.micro_batch_size
    gbs = cfg.global_batch_size if cfg.global_batch_size is not None else mbs * dp
    virtual = 1
    nlv = cfg.num_layers_per_virtual_pipeline_stage
    if nlv is not None:
        if nlv <= 0:
            raise ConfigError(f"--num-layers-per-virtual-pipeline-stage must be positive, got {nlv}")
        if model.num_layers % (pp * nlv):
            raise ConfigError(
                f"--num-layers-per-virtual-pipeline-stage {nlv} x --pipeline-model-parallel-size "
                f"{pp} does not divide the {model.num_layers} layers")
        virtual = model.num_layers // (pp * nlv)
    layout = ParallelLayout(tp=tp, pp=pp, dp=dp, micro_batch_size=mbs, global_batch_size=gbs,
                            sequence_parallel=bool(cfg.sequence_parallel) and tp > 1,
                            virtual_stages=virtual,
                            recompute_granularity=cfg.recompute_granularity, cp=cp)
    return layout.validate(model, cfg.seq_length)


# Attention backends (MEGATRON_SC2_ATTENTION) whose key bounds follow the row index of one
# [halo, chunk] key sequence, which is what context parallelism hands them.
CP_BACKENDS = ("auto", "reference")


def check_context_parallel_backend() -> None:
    """Refuse --context-parallel-size with an attention backend that cannot place the queries at
    their absolute positions after the halo."""
    import os

    backend = os.environ.get("MEGATRON_SC2_ATTENTION", "auto").strip() or "auto"
    if backend not in CP_BACKENDS:
        raise ConfigError(
            f"--context-parallel-size needs an attention backend that takes absolute query and "
            f"key positions ({', '.join(CP_BACKENDS)}); MEGATRON_SC2_ATTENTION={backend!r} does not")


class TrainConfigLike:  # pragma: no cover - typing aid only
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    context_parallel_size: int
    micro_batch_size: int
    global_batch_size: Optional[int]
    num_layers_per_virtual_pipeline_stage: Optional[int]
    sequence_parallel: bool
    recompute_granularity: Optional[str]
    seq_length: int


def split_layers(num_layers: int, num_chunks: int) -> list[range]:
    """Contiguous layer ranges for each model chunk; uneven counts put the extra layers on the
    earliest chunks (30 layers on 4 stages: 8, 8, 7, 7)."""
    base, extra = divmod(num_layers, num_chunks)
    out, start = [], 0
    for c in range(num_chunks):
        n = base + (1 if c < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out
