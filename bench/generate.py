"""Benchmark: our cached generation (window ring buffer) vs transformers' `generate`, same weights.

    .venv/bin/python bench/generate.py [--batch-sizes 1,16] [--prompt 512] [--new 128] [--repeats 3]

A random StarCoder2 of the given shape (default: 4 layers, hidden 512, 8 heads / 2 kv heads,
ffn 2048, vocab 49152, window 4096 = StarCoder2's) in fp32 on the CPU. For each batch size both
generate exactly --new tokens greedily from the same random prompts (transformers with
min_new_tokens so that it never stops early; ours without stop tokens), alternating, best of
--repeats; tokens/s = batch * new / seconds, prefill included. Also checks that both produced
the same tokens. Prints one line per batch size with the ratio ours / transformers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_sc2.eval.generate import SamplingParams, generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    from megatron_sc2.convert.hf_config import from_hf_config_dict, our_key
    from megatron_sc2.model import StarCoder2

    torch.manual_seed(0)
    hf_cfg = Starcoder2Config(
        vocab_size=49152, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=16384,
        sliding_window=a.window, rope_theta=100000.0, tie_word_embeddings=True, use_bias=True,
        norm_epsilon=1e-5, hidden_act="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0,
        initializer_range=0.02)
    hf = Starcoder2ForCausalLM(hf_cfg).eval()
    ours = StarCoder2(from_hf_config_dict(hf_cfg.to_dict())).eval()
    ours.load_state_dict({our_key(k): v for k, v in hf.state_dict().items()}, strict=False)
    print(f"model: {a.layers} layers, hidden {a.hidden}, window {a.window}, "
          f"{sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M params, fp32, {a.threads} threads; "
          f"prompt {a.prompt}, {a.new} new tokens", flush=True)
    for b in [int(x) for x in a.batch_sizes.split(",")]:
        g = torch.Generator().manual_seed(b)
        prompts = torch.randint(1, 49152, (b, a.prompt), generator=g)
        mask = torch.ones_like(prompts)
        best = {"ours": float("inf"), "transformers": float("inf")}
        out = {}
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                h = hf.generate(prompts, attention_mask=mask, max_new_tokens=a.new, min_new_tokens=a.new,
                                do_sample=False, pad_token_id=0)
            best["transformers"] = min(best["transformers"], time.perf_counter() - t0)
            out["transformers"] = h[:, a.prompt:].tolist()
            t0 = time.perf_counter()
            o = generate(ours, prompts.tolist(), SamplingParams(max_new_tokens=a.new))
            best["ours"] = min(best["ours"], time.perf_counter() - t0)
            out["ours"] = o
        same = out["ours"] == out["transformers"]
        tps = {k: b * a.new / v for k, v in best.items()}
        print(f"batch {b:>3}: ours {tps['ours']:8.1f} tok/s  transformers {tps['transformers']:8.1f} tok/s  "
              f"ratio {tps['ours'] / tps['transformers']:.2f}x  same tokens: {same}", flush=True)


if __name__ == "__main__":
    main()
