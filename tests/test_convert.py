"""Hugging Face conversion both ways, checked against transformers and safetensors.

Sources are made by transformers itself (Starcoder2ForCausalLM.save_pretrained, sharded), and
our checkpoints by the real trainer; the outputs are read back by transformers
(AutoModelForCausalLM/AutoTokenizer/AutoConfig) and the safetensors library.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Starcoder2Config, Starcoder2ForCausalLM

from megatron_sc2 import cli
from megatron_sc2.config import ModelConfig, parse_train_args
from megatron_sc2.convert.dcp_io import TensorSpec, iter_model_tensors, read_model_specs, save_model_streaming
from megatron_sc2.convert.main import parse_size
from megatron_sc2.convert.to_hf import verify_shards
from megatron_sc2.convert.safetensors_io import read_header
from megatron_sc2.convert.verify import checksum, load_our_model, max_logit_diff, verify_logits
from megatron_sc2.errors import CheckpointError, ConfigError
from megatron_sc2.training.checkpoint import find_checkpoint, read_meta

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE with StarCoder2's special tokens, trained on a few modules."""
    from megatron_sc2.data.train_tokenizer import train_tokenizer

    texts = [(STDLIB / m).read_text() for m in ("textwrap.py", "shlex.py", "glob.py")]
    return Path(train_tokenizer(texts, 512, tmp_path_factory.mktemp("tok") / "tokenizer"))


def _hf_config(tie: bool) -> Starcoder2Config:
    # Written out by hand (not from our config code), the tiny preset's shape.
    return Starcoder2Config(
        vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=16, rope_theta=10000.0, tie_word_embeddings=tie, use_bias=True,
        norm_epsilon=1e-5, hidden_act="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0,
        initializer_range=0.02)


def make_hf_dir(path: Path, tie: bool, dtype: torch.dtype, seed: int = 0,
                tokenizer: Path | None = None) -> Starcoder2ForCausalLM:
    """A transformers-saved StarCoder2 in several shards, every parameter non-trivial."""
    torch.manual_seed(seed)
    model = Starcoder2ForCausalLM(_hf_config(tie)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(path, max_shard_size="60KB")
    if tokenizer is not None:
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(path)
    return model


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(str(hf_dir / "*.safetensors"))):
        out.update(load_file(f))
    return out


def _config_dict(hf_dir: Path) -> dict:
    d = AutoConfig.from_pretrained(hf_dir).to_dict()
    for k in ("_name_or_path", "transformers_version"):
        d.pop(k, None)
    return d


def _load_hf(hf_dir: Path) -> Starcoder2ForCausalLM:
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(model).__name__ == "Starcoder2ForCausalLM"
    return model.eval()


def _cli(*argv: str) -> int:
    return cli.main(["convert", *map(str, argv)])


@pytest.mark.parametrize("tie,dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_hf_ours_hf_round_trip_is_bit_exact(tmp_path, tokenizer_dir, tie, dtype):
    src, ck, out = tmp_path / "src", tmp_path / "ck", tmp_path / "out"
    make_hf_dir(src, tie, dtype, tokenizer=tokenizer_dir)
    assert len(glob.glob(str(src / "*.safetensors"))) > 1  # really sharded
    assert _cli("from-hf", "--load", src, "--save", ck, "--tensor-model-parallel-size", "2") == 0
    meta = read_meta(find_checkpoint(ck))
    assert meta["iteration"] == 0 and meta["has_optimizer"] is False and meta["train_config"] is None
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    stored = read_model_specs(find_checkpoint(ck))
    assert ("lm_head.weight" in stored) == (not tie)
    assert {s.dtype for s in stored.values()} == {dtype}

    assert _cli("to-hf", "--load", ck, "--save", out, "--max-shard-size", "100KB") == 0
    a, b = _tensors(src), _tensors(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert _config_dict(src) == _config_dict(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    # transformers loads the export without missing/unexpected weights, with equal logits.
    tokens = torch.randint(0, 512, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(_load_hf(src)(tokens).logits, _load_hf(out)(tokens).logits)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|endoftext|>" and tok.convert_tokens_to_ids("<file_sep>") == 6
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [0, 6]


@pytest.mark.parametrize("tie", [True, False])
def test_from_hf_checkpoint_computes_transformers_logits(tmp_path, tie):
    src, ck = tmp_path / "src", tmp_path / "ck"
    hf = make_hf_dir(src, tie, torch.float32, seed=3)
    assert _cli("from-hf", "--load", src, "--save", ck, "--verify-logits") == 0
    path = find_checkpoint(ck)
    ours = load_our_model(path, ModelConfig(**read_meta(path)["model_config"]))
    cfg = ours.cfg
    assert cfg.sliding_window == 16 and cfg.tie_word_embeddings == tie
    # 96 tokens: far longer than the window of 16.
    assert max_logit_diff(ours, hf, cfg) <= 1e-4


def test_verification_catches_wrong_weights(tmp_path):
    a, b, ck, out = tmp_path / "a", tmp_path / "b", tmp_path / "ck", tmp_path / "out"
    make_hf_dir(a, True, torch.float32, seed=0)
    make_hf_dir(b, True, torch.float32, seed=1)
    assert _cli("from-hf", "--load", a, "--save", ck) == 0
    with pytest.raises(CheckpointError, match="logits .* differ"):
        verify_logits(find_checkpoint(ck), b, _tiny_cfg(True), round_to=None)
    # Flip one byte inside a tensor of an exported shard: the checksum check sees it.
    assert _cli("to-hf", "--load", ck, "--save", out) == 0
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = _tensors(out)
    specs = {k: TensorSpec(k, tuple(t.shape), t.dtype) for k, t in tensors.items()}
    sums = {k: checksum(t) for k, t in tensors.items()}
    verify_shards(out, specs, weight_map, sums)  # intact: passes
    name = "model.layers.1.mlp.c_fc.weight"
    entry = read_header(out / weight_map[name])[name]
    with open(out / weight_map[name], "r+b") as f:
        f.seek(entry.start + 100)
        byte = f.read(1)
        f.seek(entry.start + 100)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(CheckpointError, match=f"checksum of {name}"):
        verify_shards(out, specs, weight_map, sums)


def _tiny_cfg(tie: bool):
    import dataclasses

    from megatron_sc2.config import preset

    return dataclasses.replace(preset("starcoder2-tiny"), tie_word_embeddings=tie)
