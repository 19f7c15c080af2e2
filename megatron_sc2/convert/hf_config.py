"""ModelConfig <-> Hugging Face `Starcoder2Config` fields, every architecture field explicit."""

from __future__ import annotations

from typing import Any

from megatron_sc2.config import ModelConfig
from megatron_sc2.errors import CheckpointError


def to_hf_config_dict(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The config.json of a released StarCoder2, every architecture field written out (no
    `head_dim`: StarCoder2 derives it as hidden_size / num_attention_heads)."""
    return {
        "architectures": ["Starcoder2ForCausalLM"],
        "model_type": "starcoder2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_method_std,
        "norm_epsilon": cfg.norm_epsilon,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "sliding_window": cfg.sliding_window,
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "embedding_dropout": 0.0,
        "use_bias": cfg.use_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": torch_dtype,
    }


def from_hf_config_dict(d: dict[str, Any]) -> ModelConfig:
    if d.get("model_type") != "starcoder2":
        raise CheckpointError(f"not a StarCoder2 model (model_type={d.get('model_type')!r})")
    if d.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise CheckpointError(f"unsupported hidden_act {d.get('hidden_act')!r}")
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim * d["num_attention_heads"] != d["hidden_size"]:
        raise CheckpointError(
            f"head_dim {head_dim} differs from hidden_size / num_attention_heads; StarCoder2 ties them")
    rope_theta = d.get("rope_theta")
    if rope_theta is None:  # newer transformers nest it under rope_parameters
        rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        ffn_hidden_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_query_groups=d.get("num_key_value_heads", d["num_attention_heads"]),
        max_position_embeddings=d["max_position_embeddings"],
        sliding_window=d.get("sliding_window"), rope_theta=float(rope_theta),
        norm_epsilon=d.get("norm_epsilon", 1e-5), init_method_std=d.get("initializer_range", 0.02),
        tie_word_embeddings=d.get("tie_word_embeddings", True), use_bias=d.get("use_bias", True),
        bos_token_id=_first_id(d.get("bos_token_id")), eos_token_id=_first_id(d.get("eos_token_id")),
    ).validate()


def _first_id(value: Any) -> int:
    """A token id field that may be null or a list (several stop tokens): its first id, else 0."""
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if value is not None else 0


def hf_key(name: str) -> str:
    """Our parameter name -> the HF name (`model.` prefix on everything but lm_head)."""
    return name if name.startswith("lm_head") else "model." + name


def our_key(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name
