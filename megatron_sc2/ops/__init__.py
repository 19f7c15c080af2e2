"""Python face of the attention kernels: one entry point the model calls."""

from megatron_sc2.ops.attention import sliding_window_attention

__all__ = ["sliding_window_attention"]
