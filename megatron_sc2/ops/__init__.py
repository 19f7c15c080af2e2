"""Python face of the attention kernels: one entry point the model calls.

`sliding_window_attention` picks the CUDA kernel, the C++ kernel or the PyTorch reference
(`attention_backend` says which); see megatron_sc2/ops/attention.py and kernels/README.md.
"""

from megatron_sc2.ops.attention import (AttentionInputError, attention_backend,
                                        reference_attention, sliding_window_attention)

__all__ = ["AttentionInputError", "attention_backend", "reference_attention",
           "sliding_window_attention"]
