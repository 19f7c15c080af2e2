"""megatron_sc2: a training stack for the StarCoder2 family of code models."""

__version__ = "0.1.0"
