"""StarCoder2 as the paper and the Hugging Face reference define it; no parallelism inside."""

from megatron_sc2.model.starcoder2 import StarCoder2, TransformerBlock, rotary_cos_sin

__all__ = ["StarCoder2", "TransformerBlock", "rotary_cos_sin"]
