"""Cached generation against transformers' `generate` on the same weights, with a window
smaller than the prompt; batched (left padding) against one prompt at a time; sampling."""

from __future__ import annotations

import pytest
import torch
from transformers import Starcoder2Config, Starcoder2ForCausalLM

from megatron_sc2.errors import ConfigError
from megatron_sc2.eval.generate import SamplingParams, generate
from megatron_sc2.eval.loading import load_for_eval

WINDOW, NEW = 8, 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A transformers StarCoder2 (written by hand, window 8) and ours loaded from its export."""
    torch.manual_seed(3)
    hf = Starcoder2ForCausalLM(Starcoder2Config(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=WINDOW, rope_theta=10000.0, tie_word_embeddings=False, use_bias=True,
        norm_epsilon=1e-5, hidden_act="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0,
        initializer_range=0.2)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    ours = load_for_eval(d).model
    return hf, ours


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 384, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(hf, prompt, new):
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=new, do_sample=False, eos_token_id=0, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers_past_the_window(models):
    hf, ours = models
    for prompt in _prompts([20, 13, 5, 1]):
        want = _hf_greedy(hf, prompt, NEW)
        got = generate(ours, [prompt], SamplingParams(max_new_tokens=NEW, stop_ids=(0,)))[0]
        # transformers pads after eos; we stop there
        assert got == want[:len(got)] and all(t == 0 for t in want[len(got):]), (prompt, got, want)
        assert len(prompt) + len(got) > 2 * WINDOW or 0 in got


def test_batched_left_padding_equals_one_at_a_time(models):
    _, ours = models
    prompts = _prompts([3, 17, 9, 30, 11], seed=1)
    p = SamplingParams(max_new_tokens=NEW)
    one = [generate(ours, [q], p)[0] for q in prompts]
    assert generate(ours, prompts, p) == one
    assert len({tuple(r) for r in one}) == len(one)


def test_sampling_is_seeded_and_follows_temperature_and_top_p(models):
    _, ours = models
    prompts = _prompts([6, 12], seed=2)
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    a, b = generate(ours, prompts, p), generate(ours, prompts, p)
    assert a == b
    assert generate(ours, prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=8)) != a
    # a tiny top-p keeps only the most likely token: sampling becomes greedy
    greedy = generate(ours, prompts, SamplingParams(max_new_tokens=16))
    assert generate(ours, prompts, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=9)) == greedy
    # a very low temperature is greedy too
    assert generate(ours, prompts, SamplingParams(max_new_tokens=16, temperature=1e-4, seed=9)) == greedy
    with pytest.raises(ConfigError, match="--top-p"):
        generate(ours, prompts, SamplingParams(top_p=0))
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        generate(ours, prompts, SamplingParams(max_new_tokens=200))
