"""Single-process training on a small real corpus: loss falls, resume is exact, bad settings
are refused with one line."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from megatron_sc2 import cli
from megatron_sc2.config import parse_train_args
from megatron_sc2.training.checkpoint import find_checkpoint, read_meta
from megatron_sc2.training.metrics import read_metrics
from megatron_sc2.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_process")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py",
           "colorsys.py", "keyword.py", "string.py", "copy.py", "queue.py", "sched.py"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """A dozen stdlib modules as JSONL, a 512-token BPE tokenizer trained on them, and their
    .bin/.idx made by our preprocessing tool."""
    from megatron_sc2.data.prep.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    texts = [(STDLIB / m).read_text() for m in MODULES]
    jsonl = root / "code.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = train_tokenizer(texts, 512, root / "tokenizer")
    assert cli.main(["preprocess", "--input", str(jsonl), "--output-prefix", str(root / "code"),
                     "--tokenizer-model", str(tok), "--append-eod", "--workers", "1"]) == 0
    return {"tokenizer": str(tok), "data": str(root / "code_text_document"), "root": str(root)}


def _args(corpus, save: Path, *extra: str) -> list[str]:
    return ["--model", "starcoder2-tiny", "--data-path", corpus["data"],
            "--tokenizer-model", corpus["tokenizer"], "--seq-length", "64",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3",
            "--min-lr", "3e-4", "--lr-warmup-iters", "5", "--split", "100,0,0",
            "--data-cache-path", str(save / "cache"), "--save", str(save), *extra]


def test_loss_falls_on_real_code(corpus, tmp_path):
    records = Trainer(parse_train_args(_args(corpus, tmp_path, "--train-iters", "40"))).train()
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    logged = read_metrics(tmp_path)
    assert [r["step"] for r in logged] == list(range(1, 41))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples"):
        assert key in logged[-1]
    assert logged[-1]["consumed_samples"] == 40 * 8
    meta = read_meta(find_checkpoint(tmp_path))
    assert meta["iteration"] == 40 and meta["consumed_samples"] == 320


def test_resume_continues_the_same_curve_bit_for_bit(corpus, tmp_path):
    whole = tmp_path / "whole"
    parts = tmp_path / "parts"
    flags = ("--train-iters", "8", "--micro-batch-size", "2")  # 4 micro batches per step
    Trainer(parse_train_args(_args(corpus, whole, *flags))).train()
    Trainer(parse_train_args(_args(corpus, parts, *flags, "--exit-interval", "3"))).train()
    assert read_meta(find_checkpoint(parts))["iteration"] == 3
    Trainer(parse_train_args(_args(corpus, parts, *flags, "--load", str(parts)))).train()
    a = [r["loss"] for r in read_metrics(whole)]
    b = [r["loss"] for r in read_metrics(parts)]
    assert len(a) == len(b) == 8
    assert a == b


def _one_line_error(capsys, argv: list[str], expect: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expect in err, err


@pytest.mark.parametrize("flags,expect", [
    (["--model", "starcoder2-99b"], "unknown model preset"),
    (["--model", "starcoder2-tiny", "--num-query-groups", "3"], "not divisible by kv heads"),
    (["--model", "starcoder2-tiny", "--sliding-window", "1000"], "larger than the context"),
    (["--model", "starcoder2-tiny", "--seq-length", "4096"], "exceeds --max-position-embeddings"),
    (["--model", "starcoder2-tiny", "--micro-batch-size", "3", "--global-batch-size", "8"],
     "not divisible"),
    (["--model", "starcoder2-tiny", "--no-such-flag", "1"], "unknown argument"),
    (["--config", "/nonexistent/run.yaml"], "config file not found"),
])
def test_impossible_settings_are_one_line_errors(capsys, tmp_path, flags, expect):
    _one_line_error(capsys, ["train", "--mock-data", "--save", str(tmp_path), *flags], expect)


def test_missing_data_and_checkpoint_errors(capsys, corpus, tmp_path):
    _one_line_error(capsys, ["train", "--model", "starcoder2-tiny", "--tokenizer-model",
                             corpus["tokenizer"], "--data-path", str(tmp_path / "nope")], "nope")
    _one_line_error(capsys, ["train", "--model", "starcoder2-tiny", "--mock-data",
                             "--load", str(tmp_path / "empty")], "checkpoint directory not found")


def test_yaml_config_and_cli_override(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("model: starcoder2-tiny\nseq-length: 32\nmicro_batch_size: 2\n"
                        "data_path: '0.3 A 0.7 B'\nbf16: true\n")
    cfg = parse_train_args(["--config", str(cfg_file), "--seq-length", "48"])
    assert cfg.seq_length == 48 and cfg.micro_batch_size == 2 and cfg.bf16
    assert cfg.data_path == ["0.3", "A", "0.7", "B"]


def test_async_save_snapshots_each_iteration_and_resumes_exactly(corpus, tmp_path, capsys):
    """--async-save: every checkpoint holds the weights of its own iteration although training
    went on while it was written, and resuming from one continues the uninterrupted curve."""
    whole, bg = tmp_path / "whole", tmp_path / "bg"
    flags = ("--train-iters", "6", "--save-interval", "2")
    Trainer(parse_train_args(_args(corpus, whole, *flags))).train()
    Trainer(parse_train_args(_args(corpus, bg, *flags, "--async-save"))).train()
    assert "in the background" in capsys.readouterr().out
    assert sorted(p.name for p in bg.glob("iter_*")) == [f"iter_000000{i}" for i in (2, 4, 6)]
    for i in (2, 4, 6):
        assert read_meta(find_checkpoint(bg, i))["iteration"] == i
    assert (bg / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    resumed = tmp_path / "resumed"
    Trainer(parse_train_args(_args(corpus, resumed, "--train-iters", "6",
                                   "--load", str(bg / "iter_0000002")))).train()
    a = [r["loss"] for r in read_metrics(whole)]
    b = [r["loss"] for r in read_metrics(resumed)]
    assert b == a[2:]
    # A stop (here --exit-interval) waits for the background write: the run's last checkpoint
    # is complete when train() returns.
    stop = tmp_path / "stop"
    Trainer(parse_train_args(_args(corpus, stop, *flags, "--async-save", "--exit-interval", "3"))).train()
    assert read_meta(find_checkpoint(stop))["iteration"] == 3
    assert sorted(p.name for p in stop.glob("iter_*")) == ["iter_0000002", "iter_0000003"]


def test_checkpoint_converts_after_its_tokenizer_directory_is_gone(corpus, tmp_path):
    """The tokenizer is copied into each checkpoint and meta.json names the copy, so `convert
    to-hf` works on a checkpoint moved to a machine without the original tokenizer path."""
    import shutil

    tok = tmp_path / "tok"  # a tokenizer directory of our own, deleted below
    shutil.copytree(corpus["tokenizer"], tok)
    original = (tok / "tokenizer.json").read_bytes()
    save = tmp_path / "run"
    args = _args(corpus, save, "--train-iters", "1")
    args[args.index("--tokenizer-model") + 1] = str(tok)
    Trainer(parse_train_args(args)).train()
    meta = read_meta(find_checkpoint(save))
    assert not Path(meta["tokenizer"]).is_absolute()  # inside the checkpoint
    shutil.rmtree(tok)
    moved = tmp_path / "elsewhere"
    shutil.move(str(find_checkpoint(save)), str(moved / "iter_0000001"))
    assert cli.main(["convert", "to-hf", "--load", str(moved / "iter_0000001"),
                     "--save", str(tmp_path / "hf"), "--no-progress"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == original
