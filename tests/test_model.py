"""Our StarCoder2 against transformers' Starcoder2ForCausalLM on the same weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Starcoder2Config, Starcoder2ForCausalLM

from megatron_sc2.config import PRESETS, ModelConfig, preset
from megatron_sc2.convert.hf_config import hf_key, to_hf_config_dict
from megatron_sc2.errors import ConfigError
from megatron_sc2.model import StarCoder2


def _hf_model(cfg: ModelConfig, ours: StarCoder2) -> Starcoder2ForCausalLM:
    hf = Starcoder2ForCausalLM(Starcoder2Config(**to_hf_config_dict(cfg))).eval()
    sd = {hf_key(k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"} and (cfg.tie_word_embeddings or not missing)
    return hf


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("window,seq", [(16, 100), (7, 33), (None, 40)])
def test_logits_match_transformers(tie, window, seq):
    cfg = dataclasses.replace(preset("starcoder2-tiny"), tie_word_embeddings=tie, sliding_window=window)
    torch.manual_seed(0)
    ours = StarCoder2(cfg).eval()
    # Non-trivial biases and norms so every parameter matters to the comparison.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf = _hf_model(cfg, ours)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq))
    with torch.no_grad():
        a = ours(tokens)
        b = hf(tokens).logits
    assert a.shape == b.shape == (2, seq, cfg.vocab_size)
    assert (a - b).abs().max().item() <= 1e-4
    # The window must matter: a sequence longer than it differs from plain causal attention.
    if window is not None and seq > window:
        causal = StarCoder2(dataclasses.replace(cfg, sliding_window=None)).eval()
        causal.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert (causal(tokens) - a).abs().max().item() > 1e-3


@pytest.mark.parametrize("name,count", [("starcoder2-3b", 3_030_371_328),
                                        ("starcoder2-7b", 7_173_923_840),
                                        ("starcoder2-15b", 15_957_889_024)])
def test_released_presets_parameter_counts(name, count):
    cfg = preset(name)
    assert cfg.num_params() == count
    with torch.device("meta"):
        model = StarCoder2(cfg)
    assert sum(p.numel() for p in model.parameters()) == count


def test_tied_head_shares_the_embedding():
    cfg = preset("starcoder2-tiny")
    m = StarCoder2(cfg)
    assert m.lm_head.weight is m.embed_tokens.weight
    m2 = StarCoder2(dataclasses.replace(cfg, tie_word_embeddings=False))
    assert m2.lm_head.weight is not m2.embed_tokens.weight


def test_position_ids_and_documents_change_the_output():
    cfg = preset("starcoder2-tiny")
    torch.manual_seed(1)
    m = StarCoder2(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 20))
    docs = torch.tensor([[0] * 10 + [1] * 10])
    pos = torch.cat([torch.arange(10), torch.arange(10)]).unsqueeze(0)
    with torch.no_grad():
        full = m(tokens)
        split = m(tokens, position_ids=pos, document_ids=docs)
        second_alone = m(tokens[:, 10:])
    # The second document, isolated by document ids and reset positions, equals running it alone.
    assert torch.allclose(split[:, 10:], second_alone, atol=1e-5)
    assert torch.allclose(split[:, :10], full[:, :10], atol=1e-6)


@pytest.mark.parametrize("changes,match", [
    ({"num_query_groups": 3}, "not divisible by kv heads"),
    ({"sliding_window": 10_000, "max_position_embeddings": 256}, "larger than the context"),
    ({"hidden_size": 65}, "not divisible"),
])
def test_impossible_configs_are_refused(changes, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(preset("starcoder2-tiny"), **changes).validate()


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("starcoder2-99b")
    assert "starcoder2-3b" in PRESETS
