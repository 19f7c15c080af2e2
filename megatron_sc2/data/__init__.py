"""Data: tokenizer, `.bin/.idx` format, preprocessing, packed samples, blending, FIM.

Importing this package stays light (no torch, no megatron-core) so that preprocessing starts fast.
"""

from __future__ import annotations


def build_train_valid_test_datasets(cfg, tokenizer, num_samples):
    from megatron_sc2.data.datasets import build_train_valid_test_datasets as build

    return build(cfg, tokenizer, num_samples)


__all__ = ["build_train_valid_test_datasets"]
