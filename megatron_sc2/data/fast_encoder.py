"""Placeholder until the tiktoken-based encoder lands: no fast path."""


def build_fast_encoder(tokenizer):
    return None
