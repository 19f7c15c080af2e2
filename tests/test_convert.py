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
from megatron_sc2.convert.streamed_models import stream_hf_model, stream_our_model
from megatron_sc2.convert.verify import checksum, load_our_model, max_logit_diff, verify_logits
from megatron_sc2.errors import CheckpointError, ConfigError
from megatron_sc2.training.checkpoint import find_checkpoint, read_meta

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE with StarCoder2's special tokens, trained on a few modules."""
    from megatron_sc2.data.prep.train_tokenizer import train_tokenizer

    texts = [(STDLIB / m).read_text() for m in ("textwrap.py", "shlex.py", "glob.py")]
    return Path(train_tokenizer(texts, 512, tmp_path_factory.mktemp("tok") / "tokenizer"))


def _hf_config(tie: bool, layers: int = 2) -> Starcoder2Config:
    # Written out by hand (not from our config code), the tiny preset's shape.
    return Starcoder2Config(
        vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=16, rope_theta=10000.0, tie_word_embeddings=tie, use_bias=True,
        norm_epsilon=1e-5, hidden_act="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0,
        initializer_range=0.02)


def make_hf_dir(path: Path, tie: bool, dtype: torch.dtype, seed: int = 0,
                tokenizer: Path | None = None, max_shard_size: str = "60KB",
                layers: int = 2) -> Starcoder2ForCausalLM:
    """A transformers-saved StarCoder2 in several shards, every parameter non-trivial."""
    torch.manual_seed(seed)
    model = Starcoder2ForCausalLM(_hf_config(tie, layers)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
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
    # --verify-logits in both directions: with bf16 weights, through the rounding path.
    assert _cli("from-hf", "--load", src, "--save", ck, "--tensor-model-parallel-size", "2", "--verify-logits") == 0
    meta = read_meta(find_checkpoint(ck))
    assert meta["iteration"] == 0 and meta["has_optimizer"] is False and meta["train_config"] is None
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    stored = read_model_specs(find_checkpoint(ck))
    assert ("lm_head.weight" in stored) == (not tie)
    assert {s.dtype for s in stored.values()} == {dtype}

    assert _cli("to-hf", "--load", ck, "--save", out, "--max-shard-size", "100KB", "--verify-logits") == 0
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
    # The tied model as one model.safetensors (no index), the untied one sharded.
    hf = make_hf_dir(src, tie, torch.float32, seed=3, max_shard_size="1GB" if tie else "60KB")
    assert (src / "model.safetensors").is_file() == tie
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



def _layers_with_weights(layers) -> list[int]:
    return [i for i, layer in enumerate(layers) if any(p.device.type != "meta" for p in layer.parameters())]


@pytest.mark.parametrize("tie", [True, False])
def test_verify_logits_holds_one_decoder_layer_at_a_time(tmp_path, tie):
    """While either model runs a decoder layer, that layer alone (of both models) holds loaded
    weights, and they are released after it; the streamed models compute exactly what the
    fully loaded ones (ours, and transformers' from_pretrained) compute."""
    src, ck = tmp_path / "src", tmp_path / "ck"
    make_hf_dir(src, tie, torch.bfloat16, seed=4, layers=4)
    assert _cli("from-hf", "--load", src, "--save", ck) == 0
    path = find_checkpoint(ck)
    cfg = ModelConfig(**read_meta(path)["model_config"])
    ours, hf = stream_our_model(path, cfg), stream_hf_model(src)
    stacks = [list(ours.layers.values()), list(hf.model.layers)]
    assert _layers_with_weights(stacks[0]) == _layers_with_weights(stacks[1]) == []
    seen: list[tuple[int, int, list[int], list[int]]] = []
    loaded: list[weakref.ref] = []

    def watch(which: int, index: int):
        def hook(layer, _args):  # registered after the loading hook: runs once the layer is loaded
            seen.append((which, index, _layers_with_weights(stacks[0]), _layers_with_weights(stacks[1])))
            loaded.extend(weakref.ref(p) for p in layer.parameters())
        return hook

    for which, stack in enumerate(stacks):
        for index, layer in enumerate(stack):
            layer.register_forward_pre_hook(watch(which, index))
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(tokens), hf(tokens).logits
    assert [(w, i) for w, i, _, _ in seen] == [(w, i) for w in (0, 1) for i in range(4)]
    for which, index, live_ours, live_hf in seen:
        assert (live_ours, live_hf) == (([index], []) if which == 0 else ([], [index])), seen
    assert _layers_with_weights(stacks[0]) == _layers_with_weights(stacks[1]) == []
    assert len(loaded) == 2 * 4 * 16 and all(r() is None for r in loaded)  # really released
    with torch.no_grad():
        assert torch.equal(a, load_our_model(path, cfg)(tokens))
        assert torch.equal(b, _load_hf(src)(tokens).logits)
    assert (a - b).abs().max().item() <= 1e-4
    assert verify_logits(path, src, cfg, round_to=None) <= 1e-4


def _rewrite_shard(hf_dir: Path, name: str, change) -> None:
    """Rewrite the shard holding `name` with `change(tensors)` applied (the index kept in step)."""
    from safetensors.torch import save_file

    index_path = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = hf_dir / index["weight_map"][name]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    index_path.write_text(json.dumps(index))


def test_verify_logits_refuses_a_corrupt_layer_and_names_bad_weights(tmp_path):
    import shutil

    src, ck = tmp_path / "src", tmp_path / "ck"
    make_hf_dir(src, False, torch.float32, seed=6, layers=4)
    assert _cli("from-hf", "--load", src, "--save", ck) == 0
    path = find_checkpoint(ck)
    cfg = ModelConfig(**read_meta(path)["model_config"])
    assert verify_logits(path, src, cfg, round_to=None) <= 1e-4
    cases = {
        # one weight of a middle layer off by 1% of its values: the logits see it
        "corrupt": ("model.layers.2.self_attn.v_proj.weight",
                    lambda t, n: t.__setitem__(n, t[n] * 1.01), r"logits .* differ by"),
        "missing": ("model.layers.3.mlp.c_fc.bias", lambda t, n: t.pop(n),
                    r"missing weights model\.layers\.3\.mlp\.c_fc\.bias"),
        "unexpected": ("model.layers.1.mlp.c_fc.bias",
                       lambda t, n: t.__setitem__("model.layers.1.mlp.gate.weight", t[n].clone()),
                       r"unexpected weights model\.layers\.1\.mlp\.gate\.weight"),
        "mis-shaped": ("model.layers.0.self_attn.k_proj.bias", lambda t, n: t.__setitem__(n, t[n][:16].clone()),
                       r"mis-shaped weights model\.layers\.0\.self_attn\.k_proj\.bias \[16\] \(needs \[32\]\)"),
    }
    for case, (name, change, expect) in cases.items():
        bad = tmp_path / case
        shutil.copytree(src, bad)
        _rewrite_shard(bad, name, lambda tensors: change(tensors, name))
        with pytest.raises(CheckpointError, match=expect):
            verify_logits(path, bad, cfg, round_to=None)



def test_streamed_hf_model_uses_a_stored_head_of_a_tied_model_as_transformers_does(tmp_path):
    """transformers 5 unties a tied config whose shards hold a head unequal to the embedding;
    the streamed oracle computes the same logits as from_pretrained there too."""
    src = tmp_path / "src"
    make_hf_dir(src, True, torch.float32, seed=8)
    name = "model.embed_tokens.weight"
    _rewrite_shard(src, name, lambda t: t.__setitem__("lm_head.weight", t[name] * 1.5))
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expect = _load_hf(src)(tokens).logits
        assert torch.equal(stream_hf_model(src)(tokens).logits, expect)
        make_hf_dir(tmp_path / "plain", True, torch.float32, seed=8)
        assert not torch.equal(stream_hf_model(tmp_path / "plain")(tokens).logits, expect)


def _tiny_cfg(tie: bool):
    import dataclasses

    from megatron_sc2.config import preset

    return dataclasses.replace(preset("starcoder2-tiny"), tie_word_embeddings=tie)


def _train_args(save: Path, *extra: str) -> list[str]:
    return ["--model", "starcoder2-tiny", "--mock-data", "--seq-length", "64",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4",
            "--save", str(save), *extra]


@pytest.mark.parametrize("tie", [True, False])
def test_trained_checkpoint_exports_with_the_training_models_logits(tmp_path, tokenizer_dir, tie):
    from megatron_sc2.training.trainer import Trainer

    extra = () if tie else ("--untie-embeddings-and-output-weights",)
    trainer = Trainer(parse_train_args(_train_args(tmp_path / "ck", "--train-iters", "3", *extra)))
    trainer.train()
    out = tmp_path / "hf"
    assert _cli("to-hf", "--load", tmp_path / "ck", "--save", out, "--tokenizer", tokenizer_dir,
                "--verify-logits") == 0
    hf = _load_hf(out)
    model = trainer.model.eval()
    assert max_logit_diff(model, hf, model.cfg, seq_len=100) <= 1e-4
    cfg_json = json.loads((out / "config.json").read_text())
    for key in ("sliding_window", "rope_theta", "tie_word_embeddings", "hidden_act", "use_bias",
                "norm_epsilon", "num_key_value_heads", "max_position_embeddings", "vocab_size"):
        assert key in cfg_json, key
    assert cfg_json["tie_word_embeddings"] is tie and cfg_json["sliding_window"] == 16
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|endoftext|>"
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"


def test_from_hf_then_training_continues_from_the_hf_weights(tmp_path):
    """The first step's loss (before the update) is transformers' loss on the same samples."""
    from megatron_sc2.data.mock_data import MockDataset
    from megatron_sc2.training.trainer import Trainer

    src, ck = tmp_path / "src", tmp_path / "ck"
    hf = make_hf_dir(src, True, torch.float32, seed=5)
    assert _cli("from-hf", "--load", src, "--save", ck) == 0
    trainer = Trainer(parse_train_args(_train_args(tmp_path / "run", "--load", str(ck), "--train-iters", "2")))
    assert trainer.state.iteration == 0  # fresh optimizer and step counter
    records = trainer.train()
    samples = torch.from_numpy(__import__("numpy").stack([MockDataset(512, 64, 1234)[i] for i in range(4)]))
    with torch.no_grad():
        logits = hf(samples[:, :-1]).logits
    expect = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), samples[:, 1:].reshape(-1)).item()
    assert abs(records[0]["loss"] - expect) <= 1e-5 * expect
    assert records[1]["loss"] < records[0]["loss"] + 1.0 and len(records) == 2


def test_save_streams_one_tensor_at_a_time(tmp_path):
    """When the writer asks for tensor k, every tensor before k-1 has been released."""
    specs = [TensorSpec(f"layers.{i}.w", (64, 64), torch.float32) for i in range(8)]
    refs: list[weakref.ref] = []
    alive_at_fetch: list[int] = []

    def fetch(name: str) -> torch.Tensor:
        alive_at_fetch.append(sum(r() is not None for r in refs))
        t = torch.full((64, 64), float(len(refs)))
        refs.append(weakref.ref(t))
        return t

    save_model_streaming(tmp_path / "dcp", specs, fetch)
    assert len(alive_at_fetch) == 8 and max(alive_at_fetch) <= 1, alive_at_fetch
    got = dict(iter_model_tensors(tmp_path / "dcp", specs, budget_bytes=20_000))
    assert [float(got[s.name][0, 0]) for s in specs] == [float(i) for i in range(8)]


def test_from_hf_verification_reads_back_what_was_written(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_sc2.convert.from_hf import verify_checkpoint

    specs = [TensorSpec(f"w{i}", (64, 256), torch.float32) for i in range(3)]
    data = {s.name: torch.randn(s.shape) for s in specs}
    save_model_streaming(tmp_path / "ck", specs, lambda n: data[n].clone())
    sums = {n: checksum(t) for n, t in data.items()}
    verify_checkpoint(tmp_path / "ck", specs, sums)
    with pytest.raises(CheckpointError, match="tensors missing"):
        verify_checkpoint(tmp_path / "ck", specs + [TensorSpec("w9", (1,), torch.float32)], {**sums, "w9": 0})
    md = FileSystemReader(str(tmp_path / "ck")).read_metadata()
    path = tmp_path / "ck" / next(v.relative_path for k, v in md.storage_data.items() if k.fqn == "model.w1")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # inside the tensor's bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum of w1"):
        verify_checkpoint(tmp_path / "ck", specs, sums)


def _one_line_error(capsys, argv, expect: str) -> None:
    capsys.readouterr()  # drop what earlier (successful) calls printed
    assert _cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".tmp-" in p.name]


def test_refusals_name_the_problem_and_leave_nothing(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    make_hf_dir(src, False, torch.float32)
    capsys.readouterr()  # transformers' own progress output while saving the source
    cfg_path = src / "config.json"
    original = cfg_path.read_text()

    cfg_path.write_text(original.replace('"starcoder2"', '"llama"'))
    _one_line_error(capsys, ["from-hf", "--load", src, "--save", tmp_path / "c1"], "not a StarCoder2 model")
    cfg_path.write_text(original.replace('"intermediate_size": 256', '"intermediate_size": 128'))
    _one_line_error(capsys, ["from-hf", "--load", src, "--save", tmp_path / "c2"],
                    "tensor model.layers.0.mlp.c_fc.weight has shape [256, 64], but the config needs [128, 64]")
    cfg_path.write_text(original)
    _one_line_error(capsys, ["from-hf", "--load", src, "--save", tmp_path / "c3",
                             "--tensor-model-parallel-size", "3"], "does not divide the attention heads (4)")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.rename(tmp_path / "moved")
    _one_line_error(capsys, ["from-hf", "--load", src, "--save", tmp_path / "c4"],
                    f"missing shard(s) {shard.name}")
    (tmp_path / "moved").rename(shard)
    for c in ("c1", "c2", "c3", "c4"):
        assert not (tmp_path / c / "iter_0000000").exists()

    # A save directory with only an unfinished checkpoint (no `complete` marker).
    ck = tmp_path / "ck"
    assert _cli("from-hf", "--load", src, "--save", ck) == 0
    half = tmp_path / "half"
    (half / "iter_0000007").mkdir(parents=True)
    for f in (ck / "iter_0000000").iterdir():
        if f.is_file() and f.name != "complete":
            (half / "iter_0000007" / f.name).write_bytes(f.read_bytes())
    _one_line_error(capsys, ["to-hf", "--load", half, "--save", tmp_path / "h1"], "no finished checkpoint")
    _one_line_error(capsys, ["from-hf", "--load", src, "--save", ck], "already holds checkpoints")
    # Failures part-way leave no output behind: a missing tokenizer (checked first), and a
    # verification failure after every shard was written.
    import megatron_sc2.convert.to_hf as to_hf_module

    def failing_verify(*args, **kwargs):
        assert len(list(glob.glob(str(args[0] / "model-*.safetensors")))) == 1  # shards written
        raise CheckpointError("verify: simulated mismatch")

    with monkeypatch.context() as m:
        m.setattr(to_hf_module, "verify_shards", failing_verify)
        _one_line_error(capsys, ["to-hf", "--load", ck, "--save", tmp_path / "h2"], "simulated mismatch")
    assert not (tmp_path / "h2").exists() and not _leftovers(tmp_path)
    _one_line_error(capsys, ["to-hf", "--load", ck, "--save", tmp_path / "h2", "--tokenizer",
                             tmp_path / "nope.json"], "tokenizer not found")
    assert not (tmp_path / "h2").exists() and not _leftovers(tmp_path)
    big = tmp_path / "big_tokenizer.json"  # 600 tokens for a 512-token model
    from tokenizers import Tokenizer, models

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 600)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.save(str(big))
    _one_line_error(capsys, ["to-hf", "--load", ck, "--save", tmp_path / "h2", "--tokenizer", big],
                    "has 600 tokens but the model's vocabulary has only 512")
    assert not (tmp_path / "h2").exists() and not _leftovers(tmp_path)
    # Re-exporting over a previous export replaces it; any other non-empty directory needs --force.
    assert _cli("to-hf", "--load", ck, "--save", tmp_path / "h3") == 0
    assert _cli("to-hf", "--load", ck, "--save", tmp_path / "h3", "--dtype", "bf16") == 0
    assert {t.dtype for t in _tensors(tmp_path / "h3").values()} == {torch.bfloat16}
    (tmp_path / "h3" / "notes.txt").write_text("mine")
    _one_line_error(capsys, ["to-hf", "--load", ck, "--save", tmp_path / "h3"], "already exists")
    assert (tmp_path / "h3" / "notes.txt").is_file()
    assert _cli("to-hf", "--load", ck, "--save", tmp_path / "h3", "--force") == 0
    assert {t.dtype for t in _tensors(tmp_path / "h3").values()} == {torch.float32}
    assert not (tmp_path / "h3" / "notes.txt").exists()
    _one_line_error(capsys, ["to-hf", "--load", ck, "--save", tmp_path / "h4", "--max-shard-size", "5XB"],
                    "--max-shard-size")
    assert not _leftovers(tmp_path)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("100KB") == 100_000
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1234") == 1234
    with pytest.raises(ConfigError):
        parse_size("lots")


def _sharded_save_worker(rank: int, world: int, init_file: str, save: str, state_path: str) -> None:
    """One rank of a 2-process gloo world: save the model as DTensor shards split the way
    tensor parallelism splits them (column-parallel on dim 0, row-parallel on dim 1)."""
    import gc

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from megatron_sc2.training import checkpoint as ck

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    full = torch.load(state_path)
    model_cfg = full.pop("__config__")

    def placement(name: str, t: torch.Tensor):
        if name.endswith(("o_proj.weight", "c_proj.weight")):
            return [Shard(1)]
        if t.dim() == 2 or name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "c_fc.bias")):
            return [Shard(0)]
        return [Replicate()]

    shards = {n: distribute_tensor(t, mesh, placement(n, t)) for n, t in full.items()}
    tmp = ck.temporary_dir(save, 4, "test")
    dcp.save({"model": shards}, checkpoint_id=str(tmp))
    dist.barrier()
    if rank == 0:
        ck.write_meta(tmp, {"iteration": 4, "consumed_samples": 0, "model_config": model_cfg,
                            "train_config": None, "tokenizer": None, "has_optimizer": False})
        ck.finalize(tmp, save, 4)
    dist.barrier()
    del shards
    gc.collect()
    dist.destroy_process_group()


def test_export_reassembles_a_tensor_parallel_sharded_checkpoint(tmp_path):
    """A checkpoint whose weights were saved as TP-style DTensor shards by 2 processes exports
    every tensor bit for bit."""
    import torch.multiprocessing as mp

    from megatron_sc2.model import StarCoder2

    cfg = _tiny_cfg(False)
    torch.manual_seed(7)
    model = StarCoder2(cfg)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({**full, "__config__": cfg.to_dict()}, tmp_path / "state.pt")
    mp.start_processes(_sharded_save_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ck"),
                                                   str(tmp_path / "state.pt")),
                       nprocs=2, join=True, start_method="spawn")
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(find_checkpoint(tmp_path / "ck"))).read_metadata().state_dict_metadata
    assert len(md["model.layers.0.self_attn.o_proj.weight"].chunks) == 2  # really sharded
    out = tmp_path / "hf"
    assert _cli("to-hf", "--load", tmp_path / "ck", "--save", out, "--verify-logits") == 0
    got = _tensors(out)
    assert set(got) == {("" if k.startswith("lm_head") else "model.") + k for k in full}
    for k, t in full.items():
        assert torch.equal(got[("" if k.startswith("lm_head") else "model.") + k], t), k
    # Cast on export: the same bits as torch's own fp32 -> bf16 rounding.
    assert _cli("to-hf", "--load", tmp_path / "ck", "--save", tmp_path / "bf16", "--dtype", "bf16") == 0
    got = _tensors(tmp_path / "bf16")
    for k, t in full.items():
        g = got[("" if k.startswith("lm_head") else "model.") + k]
        assert g.dtype == torch.bfloat16 and torch.equal(g.view(torch.int16), t.to(torch.bfloat16).view(torch.int16)), k


def _released_style_config(hidden, ffn, layers, heads, kv, theta, tie, init) -> dict:
    """A config.json as the released StarCoder2 checkpoints write it (transformers 4 layout:
    top-level rope_theta, torch_dtype), values from the model cards."""
    return {"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2",
            "attention_dropout": 0.1, "residual_dropout": 0.1, "embedding_dropout": 0.1,
            "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "initializer_range": init,
            "max_position_embeddings": 16384, "norm_epsilon": 1e-5, "rope_theta": theta,
            "sliding_window": 4096, "use_bias": True, "use_cache": True, "vocab_size": 49152,
            "tie_word_embeddings": tie, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize("name,values", [
    ("starcoder2-3b", (3072, 12288, 30, 24, 2, 999999.4420358813, True, 0.018042)),
    ("starcoder2-7b", (4608, 18432, 32, 36, 4, 1000000, True, 0.018042)),
    ("starcoder2-15b", (6144, 24576, 40, 48, 4, 100000, False, 0.01275)),
])
def test_released_configs_map_to_our_presets(name, values):
    from megatron_sc2.config import preset
    from megatron_sc2.convert.from_hf import check_parallel_sizes
    from megatron_sc2.convert.hf_config import from_hf_config_dict, to_hf_config_dict

    released = _released_style_config(*values)
    ours = from_hf_config_dict(released)
    assert ours == preset(name)
    check_parallel_sizes(ours, 4, 2)
    written = to_hf_config_dict(ours, "bfloat16")
    for key, value in released.items():
        if not key.endswith("dropout"):  # pretraining used none; we write 0.0
            assert written[key] == value, key


def test_tools_script_is_the_same_command(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "tools" / "convert_checkpoint.py"
    proc = subprocess.run([sys.executable, str(script), "from-hf", "--load", str(tmp_path / "none"),
                           "--save", str(tmp_path / "ck")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"convert_checkpoint.py: error: Hugging Face directory not found: {tmp_path / 'none'}"]
