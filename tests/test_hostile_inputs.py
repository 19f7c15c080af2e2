"""Hostile inputs through the real command line (issue 12): every case ends in exit status 2 and
one line on stderr naming the file, line or flag; no traceback; no crafted payload runs; no
new file appears (no output under a final name, no temporary left behind); what was there
before (inputs, previous outputs, checkpoints) is byte for byte intact.

Most cases run in this process (`megatron_sc2.cli.main`, stderr captured) so that the table
stays cheap; a few go through a real subprocess to prove the exit status and the absence of a
traceback as a user sees them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from megatron_sc2.cli import main as cli_main
from megatron_sc2.data.indexed import IndexedDataset, IndexedWriter, write_documents

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "starcoder2-tiny", "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "1",
        "--log-interval", "1"]


class Payload:
    """Unpickling this runs `touch MARKER`: a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class World:
    root: Path
    tokenizer: Path
    ckpt: Path        # iterations 1 and 2, complete
    data: Path        # a small uint16 dataset prefix


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("hostile")
    from megatron_sc2.data.prep.train_tokenizer import train_tokenizer

    texts = [f"def f{i}(x):\n    return x + {i}  # <fim_middle> {i}\n" for i in range(200)]
    tok = train_tokenizer(texts, 400, root / "tok")
    with pytest.MonkeyPatch.context() as m:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
            m.delenv(k, raising=False)
        rc = cli_main(["train", "--mock-data", *TINY, "--train-iters", "2", "--save-interval", "1",
                       "--save", str(root / "ckpt")])
    assert rc == 0
    data = root / "data" / "d_text_document"
    rng = np.random.default_rng(0)
    write_documents(data, [rng.integers(0, 300, size=40).tolist() for _ in range(30)], np.uint16)
    return World(root, Path(tok), root / "ckpt", data)


@dataclass
class Case:
    argv: list[str]
    expect: str                           # must appear in the one line on stderr
    marker: Optional[Path] = None         # a payload would create this file
    allow_new: tuple[str, ...] = ()       # names that may appear (none by default)


def _snapshot(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_symlink() or not p.is_file():
            out[str(p.relative_to(d))] = "link-or-dir"
        else:
            out[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _copy_ckpt(w: World, d: Path) -> Path:
    dst = d / "ckpt"
    shutil.copytree(w.ckpt, dst)
    return dst


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _pre(w: World, inp, out, *extra) -> list[str]:
    inputs = [str(i) for i in (inp if isinstance(inp, list) else [inp])]
    return ["preprocess", "--input", *inputs, "--output-prefix", str(out), "--tokenizer-model", str(w.tokenizer),
            "--no-progress", *extra]


def _train(*extra) -> list[str]:
    return ["train", *TINY, "--train-iters", "3", *extra]


def _write_idx(prefix: Path, dtype_code: int, values: np.ndarray) -> None:
    """A .bin/.idx pair with any dtype code (the writer itself refuses nothing here)."""
    values.tofile(str(prefix) + ".bin")
    n = len(values)
    with open(str(prefix) + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code) + struct.pack("<QQ", 1, 2))
        f.write(np.asarray([n], "<i4").tobytes() + np.asarray([0], "<i8").tobytes() + np.asarray([0, 1], "<i8").tobytes())


# -- the five worst cases ---------------------------------------------------------------------------

def c_rng_payload(w, d):
    ck = _copy_ckpt(w, d)
    import torch

    torch.save({"torch": Payload(d / "PWNED")}, ck / "iter_0000002" / "rng" / "rank_0.pt")
    return Case(_train("--mock-data", "--load", str(ck)), "rank_0.pt", d / "PWNED")


def _evil_metadata(ck: Path, marker: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(ck)).read_metadata()
    md.planner_data = Payload(marker)
    with open(ck / ".metadata", "wb") as f:
        pickle.dump(md, f)


def c_metadata_payload_train(w, d):
    ck = _copy_ckpt(w, d)
    _evil_metadata(ck / "iter_0000002", d / "PWNED")
    return Case(_train("--mock-data", "--load", str(ck)), ".metadata", d / "PWNED")


def c_metadata_payload_to_hf(w, d):
    ck = _copy_ckpt(w, d)
    _evil_metadata(ck / "iter_0000002", d / "PWNED")
    return Case(["convert", "to-hf", "--load", str(ck), "--save", str(d / "hf"), "--no-progress"],
                ".metadata", d / "PWNED")


def c_byte_item_payload(w, d):
    """A non-tensor item (optimizer hyper-parameters) pointing at a pickled payload."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ck = _copy_ckpt(w, d)
    it = ck / "iter_0000002"
    md = FileSystemReader(str(it)).read_metadata()
    buf = io.BytesIO()
    torch.save(Payload(d / "PWNED"), buf)
    (it / "evil.distcp").write_bytes(buf.getvalue())
    for idx, info in md.storage_data.items():
        if isinstance(md.state_dict_metadata.get(idx.fqn), BytesStorageMetadata):
            info.relative_path, info.offset, info.length = "evil.distcp", 0, len(buf.getvalue())
    with open(it / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return Case(_train("--mock-data", "--load", str(ck)), "--ckpt-step 1", d / "PWNED")


def c_tensor_item_payload(w, d):
    """A tensor item pointing at a pickled payload instead of a tensor (DCP loads tensors with
    weights_only=True itself: the payload is refused there, and named as one line here)."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ck = _copy_ckpt(w, d)
    it = ck / "iter_0000002"
    md = FileSystemReader(str(it)).read_metadata()
    buf = io.BytesIO()
    torch.save(Payload(d / "PWNED"), buf)
    (it / "evil.distcp").write_bytes(buf.getvalue())
    for idx, info in md.storage_data.items():
        if idx.fqn.startswith("model.") and isinstance(md.state_dict_metadata.get(idx.fqn), TensorStorageMetadata):
            info.relative_path, info.offset, info.length = "evil.distcp", 0, len(buf.getvalue())
    with open(it / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return Case(_train("--mock-data", "--load", str(ck)), "--ckpt-step 1", d / "PWNED")


def c_tensor_item_payload_to_hf(w, d):
    case = c_tensor_item_payload(w, d)
    return Case(["convert", "to-hf", "--load", str(d / "ckpt"), "--save", str(d / "hf"), "--no-progress"],
                "iter_0000002", case.marker)


def c_convert_save_is_load(w, d):
    ck = _copy_ckpt(w, d)
    return Case(["convert", "to-hf", "--load", str(ck), "--save", str(ck), "--force", "--no-progress"], "overlap")


def c_convert_save_inside_load(w, d):
    ck = _copy_ckpt(w, d)
    return Case(["convert", "to-hf", "--load", str(ck / "iter_0000002"), "--save", str(ck), "--force",
                 "--no-progress"], "overlap")


def c_convert_foreign_dir(w, d):
    (d / "results").mkdir()
    (d / "results" / "eval_results.json").write_text('{"pass@1": 0.31}\n')
    (d / "results" / "config.json").write_text("{}\n")
    return Case(["convert", "to-hf", "--load", str(w.ckpt), "--save", str(d / "results"), "--no-progress"],
                "--force")


def c_from_hf_into_own_input(w, d):
    (d / "hf").mkdir()
    return Case(["convert", "from-hf", "--load", str(d / "hf"), "--save", str(d / "hf" / "ckpt")], "overlap")


# -- tracebacks that must become one line -----------------------------------------------------------

def c_list_items_not_strings(w, d):
    return Case(_pre(w, _jsonl(d / "in.jsonl", [{"text": "ok"}, {"text": ["a", 3, None]}]), d / "out"),
                "in.jsonl:2")


def c_json_nested_deep(w, d):
    return Case(_pre(w, _jsonl(d / "in.jsonl", ['{"text": ' + "[" * 100000 + "]" * 100000 + "}"]), d / "out"),
                "in.jsonl:1")


def c_input_dangling_link(w, d):
    (d / "gone.jsonl").symlink_to(d / "nowhere.jsonl")
    return Case(_pre(w, d / "gone.jsonl", d / "out"), "gone.jsonl")


def c_input_link_loop(w, d):
    (d / "a.jsonl").symlink_to(d / "b.jsonl")
    (d / "b.jsonl").symlink_to(d / "a.jsonl")
    return Case(_pre(w, d / "a.jsonl", d / "out"), "a.jsonl")


def c_input_fifo(w, d):
    os.mkfifo(d / "pipe.jsonl")
    return Case(_pre(w, d / "pipe.jsonl", d / "out"), "pipe.jsonl")


def c_input_device(w, d):
    return Case(_pre(w, "/dev/zero", d / "out"), "/dev/zero")


def c_output_is_directory(w, d):
    (d / "out_text_document.bin").mkdir()
    return Case(_pre(w, _jsonl(d / "in.jsonl", [{"text": "x = 1"}]), d / "out"), "out_text_document.bin")


def c_output_parent_is_file(w, d):
    (d / "afile").write_text("not a directory\n")
    return Case(_pre(w, _jsonl(d / "in.jsonl", [{"text": "x = 1"}]), d / "afile" / "out"), "afile")


def c_output_idx_is_directory(w, d):
    (d / "out_text_document.idx").mkdir()
    return Case(_pre(w, _jsonl(d / "in.jsonl", [{"text": "x = 1"}]), d / "out"), "out_text_document.idx")


def c_train_save_is_a_file(w, d):
    (d / "ck").write_text("a file, not a directory\n")
    return Case(_train("--mock-data", "--train-iters", "1", "--save-interval", "1", "--save", str(d / "ck"),
                       "--log-dir", str(d / "logs")), "ck", allow_new=("logs", "logs/metrics.jsonl"))


def c_to_hf_save_is_a_file(w, d):
    (d / "hf").write_text("a file\n")
    return Case(["convert", "to-hf", "--load", str(w.ckpt), "--save", str(d / "hf"), "--no-progress"], "hf")


def c_merge_into_directory(w, d):
    (d / "m.bin").mkdir()
    return Case(["merge", "--inputs", str(w.data), "--output-prefix", str(d / "m")], "m.bin")


def c_negative_token_ids(w, d):
    _write_idx(d / "neg", 3, np.asarray([5, -3, 7, 9], dtype=np.int16))
    return Case(_train("--data-path", str(d / "neg"), "--split", "1,0,0", "--tokenizer-model", str(w.tokenizer)), "negative token id")


def c_negative_ids_inspect(w, d):
    _write_idx(d / "neg", 3, np.asarray([5, -3, 7, 9], dtype=np.int16))
    return Case(["inspect", str(d / "neg"), "--decode", "0", "--tokenizer-model", str(w.tokenizer)],
                "negative token id")


def c_split_nan(w, d):
    return Case(_train("--data-path", str(w.data), "--split", "nan,1,0", "--tokenizer-model", str(w.tokenizer)), "--split")


def c_split_inf(w, d):
    return Case(_train("--data-path", str(w.data), "--split", "inf,1,0", "--tokenizer-model", str(w.tokenizer)), "--split")


def c_blend_weight_nan(w, d):
    return Case(_train("--data-path", f"nan {w.data} 1 {w.data}", "--tokenizer-model", str(w.tokenizer)), "weights")


def c_yaml_null(w, d):
    (d / "c.yaml").write_text("lr: ~\n")
    return Case(_train("--mock-data", "--config", str(d / "c.yaml")), "'lr'")


def c_lr_negative(w, d):
    return Case(_train("--mock-data", "--lr", "-0.1"), "--lr")


def c_beta_out_of_domain(w, d):
    return Case(_train("--mock-data", "--adam-beta2", "1.0"), "--adam-beta2")


def c_eps_zero(w, d):
    return Case(_train("--mock-data", "--adam-eps", "0"), "--adam-eps")


def c_vocab_below_tokenizer(w, d):
    return Case(_train("--data-path", str(w.data), "--tokenizer-model", str(w.tokenizer), "--vocab-size", "300"),
                "--vocab-size")


def c_no_such_device(w, d):
    return Case(_train("--mock-data", "--device", "cuda:7"), "--device")


def c_bad_device_name(w, d):
    return Case(_train("--mock-data", "--device", "toaster"), "--device")


def c_corrupt_shard(w, d):
    ck = _copy_ckpt(w, d)
    shard = ck / "iter_0000002" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    return Case(_train("--mock-data", "--load", str(ck)), "--ckpt-step 1")


def c_corrupt_shard_to_hf(w, d):
    ck = _copy_ckpt(w, d)
    shard = ck / "iter_0000002" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:5000])
    return Case(["convert", "to-hf", "--load", str(ck), "--save", str(d / "hf"), "--no-progress"], "--ckpt-step 1")


def c_corrupt_metadata(w, d):
    ck = _copy_ckpt(w, d)
    (ck / "iter_0000002" / ".metadata").write_bytes(b"\x80\x04garbage")
    return Case(_train("--mock-data", "--load", str(ck)), "--ckpt-step 1")


def c_corrupt_metadata_to_hf(w, d):
    ck = _copy_ckpt(w, d)
    (ck / "iter_0000002" / ".metadata").write_bytes(b"")
    return Case(["convert", "to-hf", "--load", str(ck), "--save", str(d / "hf"), "--no-progress"], ".metadata")


def c_meta_json_lies_iteration(w, d):
    ck = _copy_ckpt(w, d)
    meta = json.loads((ck / "iter_0000002" / "meta.json").read_text())
    meta["iteration"] = -4
    (ck / "iter_0000002" / "meta.json").write_text(json.dumps(meta))
    return Case(_train("--mock-data", "--load", str(ck)), "meta.json")


def c_meta_json_lies_shapes(w, d):
    ck = _copy_ckpt(w, d)
    meta = json.loads((ck / "iter_0000002" / "meta.json").read_text())
    meta["model_config"]["hidden_size"] = 128
    (ck / "iter_0000002" / "meta.json").write_text(json.dumps(meta))
    return Case(["convert", "to-hf", "--load", str(ck), "--save", str(d / "hf"), "--no-progress"], "iter_0000002")


def c_ckpt_step_missing(w, d):
    return Case(_train("--mock-data", "--load", str(w.ckpt), "--ckpt-step", "7"), "iteration 7")


# -- silently wrong data that must be refused -------------------------------------------------------

def c_float_dataset(w, d):
    _write_idx(d / "f", 7, np.asarray([5.7, 3.2, 7.9, 9.1], dtype=np.float32))
    return Case(_train("--data-path", str(d / "f"), "--split", "1,0,0", "--tokenizer-model", str(w.tokenizer)), "float32")


def c_yaml_float_for_int(w, d):
    (d / "c.yaml").write_text("seed: 2.7\n")
    return Case(_train("--mock-data", "--config", str(d / "c.yaml")), "'seed'")


def c_yaml_bool_for_float(w, d):
    (d / "c.yaml").write_text("lr: true\n")
    return Case(_train("--mock-data", "--config", str(d / "c.yaml")), "'lr'")


def c_yaml_fraction_iters(w, d):
    (d / "c.yaml").write_text("train_iters: 2.9\n")
    return Case(_train("--mock-data", "--config", str(d / "c.yaml")), "'train_iters'")


def c_yaml_duplicate_key(w, d):
    (d / "c.yaml").write_text("lr: 0.001\nseed: 1\nlr: 0.1\n")
    return Case(_train("--mock-data", "--config", str(d / "c.yaml")), "c.yaml:3")


def c_json_keys_twice(w, d):
    return Case(_pre(w, _jsonl(d / "in.jsonl", [{"text": "x"}]), d / "out", "--json-keys", "text", "text"),
                "--json-keys")


def c_dir_of_jsonl_shards(w, d):
    (d / "shards").mkdir()
    _jsonl(d / "shards" / "part-0.jsonl", [{"text": "x = 1"}])
    return Case(_pre(w, d / "shards", d / "out"), "part-0.jsonl")


def c_newline_in_repo_path(w, d):
    recs = [{"repo_name": "r", "path": "a.py\nimport os", "content": "x = 1\n"}]
    return Case(_pre(w, _jsonl(d / "in.jsonl", recs), d / "out", "--repo-context"), "in.jsonl:1")


def c_special_token_in_repo_name(w, d):
    recs = [{"repo_name": "x<file_sep>y", "path": "a.py", "content": "x = 1\n"}]
    return Case(_pre(w, _jsonl(d / "in.jsonl", recs), d / "out", "--repo-context"), "in.jsonl:1")


def c_sentencepiece_cannot_spell_special_text(w, d):
    """A SentencePiece model without byte fallback that lacks the characters of <|endoftext|>
    cannot write code quoting it as text: one line, not a silent <unk>."""
    from tests.test_data_tokenizer import train_sp_model

    model = train_sp_model(d / "sp", byte_fallback=False, corpus=[f"x{i} = {i}\n" for i in range(200)])
    argv = _pre(w, _jsonl(d / "in.jsonl", [{"text": "ok = 1\n"}, {"text": "s = '<|endoftext|>'\n"}]), d / "out")
    argv[argv.index("--tokenizer-model") + 1] = str(model)
    return Case(argv, "in.jsonl:2")


def c_skip_malformed_keeps_nothing_silent(w, d):
    """--skip-malformed skips and counts bad lines; when nothing is left it still says so."""
    return Case(_pre(w, _jsonl(d / "in.jsonl", [{"text": ["a", 3]}, {"text": None}, '{"text": ' + "[" * 9999]),
                     d / "out", "--skip-malformed"), "no documents")


def c_previous_output_intact(w, d):
    """A failing run over an existing dataset leaves that dataset as it was."""
    write_documents(d / "out_text_document", [[1, 2, 3]], np.uint16)
    return Case(_pre(w, _jsonl(d / "in.jsonl", [{"text": "ok"}, "{broken"]), d / "out"), "in.jsonl:2")


def c_bad_flag_value_is_one_line(w, d):
    """A flag argparse cannot parse: one line naming it, not argparse's usage block."""
    return Case(_train("--mock-data", "--lr", "abc"), "argument --lr: invalid float value: 'abc'")


def c_missing_required_flag_is_one_line(w, d):
    return Case(["remove", "--data-path", str(w.data)], "required: --repos, --output-prefix")


def c_unknown_subcommand_flag_is_one_line(w, d):
    return Case(["portrait", "query", str(d), "--bogus"], "unrecognized arguments: --bogus")


CASES: dict[str, Callable] = {name[2:]: fn for name, fn in list(globals().items()) if name.startswith("c_")}


def test_hostile_inputs_end_in_one_line(world, tmp_path, capsys, monkeypatch):
    """Every case of the table, one after the other in this process."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    failures = []
    before_world = _snapshot(world.root)
    for name, build in CASES.items():
        d = tmp_path / name
        d.mkdir()
        case = build(world, d)
        before = _snapshot(d)
        capsys.readouterr()
        old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError(name)))
        signal.alarm(60)  # a hang (a FIFO opened for reading) fails the case instead of the suite
        try:
            rc = cli_main(case.argv)
        except BaseException as e:  # noqa: BLE001 - a traceback is what the case must not show
            rc = f"raised {type(e).__name__}: {e}"
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        err = capsys.readouterr().err.strip()
        lines = err.splitlines()
        after = _snapshot(d)
        problems = []
        if rc != 2:
            problems.append(f"exit {rc}")
        if len(lines) != 1 or "Traceback" in err:
            problems.append(f"stderr has {len(lines)} lines")
        if case.expect not in err:
            problems.append(f"{case.expect!r} not named")
        if case.marker is not None and case.marker.exists():
            problems.append("PAYLOAD RAN")
        new = sorted(set(after) - set(before) - set(case.allow_new))
        if new:
            problems.append(f"new files {new[:3]}")
        changed = sorted(k for k in before if after.get(k) != before[k])
        if changed:
            problems.append(f"changed {changed[:3]}")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)} | {err[:300]}")
    assert _snapshot(world.root) == before_world, "a case changed the shared checkpoint or data"
    assert not failures, "\n".join(failures)
    assert len(CASES) >= 44  # the table did not shrink unnoticed


def test_exit_status_and_no_traceback_in_a_real_process(world, tmp_path):
    """The same refusals as a user sees them: a separate interpreter, its status and stderr."""
    ck = _copy_ckpt(world, tmp_path)
    _evil_metadata(ck / "iter_0000002", tmp_path / "PWNED")
    bad_jsonl = _jsonl(tmp_path / "in.jsonl", [{"text": "x"}, '{"text": ' + "[" * 50000])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        env.pop(k, None)
    # One interpreter for all three (one torch start-up): two in-process calls print their
    # statuses, the last one's status is the interpreter's exit status, as `megatron-sc2` does.
    script = ("import sys\nfrom megatron_sc2.cli import main\nrcs = []\n"
              "for argv in %r:\n    rcs.append(main(argv))\nprint(rcs, flush=True)\nsys.exit(main(%r))\n")
    argvs = [["convert", "to-hf", "--load", str(ck), "--save", str(tmp_path / "hf"), "--no-progress"],
             _pre(world, bad_jsonl, tmp_path / "out")]
    last = ["train", "--mock-data", *TINY, "--train-iters", "3", "--load", str(ck)]
    proc = subprocess.run([sys.executable, "-c", script % (argvs, last)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert "[2, 2]" in proc.stdout and proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert ".metadata" in lines[0] and "in.jsonl:2" in lines[1] and "refused global posix.system" in lines[2]
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "hf").exists()
    # A reader that closes the pipe early: quiet, the shell's status for SIGPIPE (or 0).
    big = tmp_path / "big_text_document"
    write_documents(big, [list(range(300)) * 400] * 3, np.uint16)  # ~500 KB of ids per document
    cmd = (f"{sys.executable} -m megatron_sc2.cli inspect {big} --decode 0 --decode 1 --decode 2 "
           f"--max-chars 200000 | head -c 10 > /dev/null; echo status ${{PIPESTATUS[0]}}")
    proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and proc.stderr.strip() == "", proc.stderr
    assert proc.stdout.strip() == "status 141", proc.stdout  # far more than a pipe holds: EPIPE for sure


def test_directory_inputs_stay_inside_their_root(world, tmp_path, capsys, monkeypatch):
    """Symlinks out of the input, FIFOs, devices, loops, dangling links, oversized files and
    unsafe names are skipped, counted and named; nothing outside the input reaches the data;
    the FIFO does not hang the run."""
    secret = tmp_path / "outside" / "secret.py"
    secret.parent.mkdir()
    secret.write_text("SECRET_TOKEN = 'hunter2'\n")
    repos = tmp_path / "repos"
    (repos / "r1" / "pkg").mkdir(parents=True)
    (repos / "r1" / "main.py").write_text("print('hello')\n")
    (repos / "r1" / "pkg" / "inner.py").write_text("x = 1\n")
    (repos / "r1" / "leak.py").symlink_to(secret)
    (repos / "r1" / "leakdir").symlink_to(secret.parent)
    (repos / "r1" / "alias.py").symlink_to(repos / "r1" / "main.py")   # inside: read
    (repos / "r1" / "loop").symlink_to(repos / "r1" / "loop")
    (repos / "r1" / "dangling.py").symlink_to(repos / "r1" / "nope.py")
    (repos / "r1" / "up").symlink_to(repos)                             # a directory loop
    os.mkfifo(repos / "r1" / "fifo.py")
    (repos / "r1" / "dev.py").symlink_to("/dev/zero")
    (repos / "r1" / "new\nline.py").write_text("y = 2\n")
    (repos / "r1" / "<file_sep>x.py").write_text("z = 3\n")
    (repos / "outside_repo").symlink_to(secret.parent)
    big = repos / "r1" / "big.py"
    big.write_text("#" * 5000 + "\n")
    old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("hang")))
    signal.alarm(60)
    try:
        import megatron_sc2.data.prep.corpus as corpus

        monkeypatch.setattr(corpus, "DEFAULT_MAX_READ_BYTES", 4000)  # the 64 MiB cap, scaled down
        rc = cli_main(_pre(world, repos, tmp_path / "out"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err
    assert rc == 0, err
    from megatron_sc2.data.tokenizer import load_tokenizer

    tok = load_tokenizer(world.tokenizer)
    ds = IndexedDataset(tmp_path / "out_text_document")
    text = "".join(tok.decode(ds.document(i).tolist()) for i in range(ds.num_documents))
    assert "hunter2" not in text and "SECRET" not in text
    assert "print('hello')" in text and "x = 1" in text
    assert ds.num_documents == 1  # the top-level link to the outside directory is no repository
    for named in ("leak.py", "leakdir", "outside_repo", "loop", "dangling.py", "fifo.py", "dev.py",
                  "new\\\\nline.py", "<file_sep>x.py", "big.py", "up"):
        assert named in err, (named, err)
    for counter in ("symlinks outside 4", "broken symlinks 2", "special files 1", "unsafe names 2",
                    "oversized files 1", "linked directories 1"):
        assert counter in err, (counter, err)


def test_special_token_text_is_text(world, tmp_path, capsys):
    """Code quoting special tokens keeps them as text (fast path and fallback alike): the only
    control tokens are our separators and the end-of-document; `--parse-special-tokens` is
    Megatron's behaviour (the literal becomes the control token, as `tokenizers` does)."""
    from tokenizers import Tokenizer as HF

    tok_path = world.tokenizer / "tokenizer.json"
    plain, parsing = HF.from_file(str(tok_path)), HF.from_file(str(tok_path))
    plain.encode_special_tokens = True
    texts = ["s = '<|endoftext|>'\nt = '<fim_middle>'\n", "# <file_sep>x.py\n<repo_name>", "ok = 1\n"]
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    for extra in ([], ["--no-fast-encoder"]):
        capsys.readouterr()
        assert cli_main(_pre(world, inp, tmp_path / "a", "--append-eod", *extra)) == 0
        assert ("encoder: tiktoken" in capsys.readouterr().err) == (not extra)  # both paths really ran
        ds = IndexedDataset(tmp_path / "a_text_document")
        for i, t in enumerate(texts):
            assert ds.document(i).tolist() == plain.encode(t, add_special_tokens=False).ids + [0]
            assert not set(ds.document(i)[:-1].tolist()) & set(range(38))
        assert cli_main(_pre(world, inp, tmp_path / "m", "--append-eod", "--parse-special-tokens", *extra)) == 0
        ds = IndexedDataset(tmp_path / "m_text_document")
        for i, t in enumerate(texts):
            assert ds.document(i).tolist() == parsing.encode(t, add_special_tokens=False).ids + [0]
    # Repository documents: a file whose code holds separators gets exactly one <file_sep> per file.
    repos = tmp_path / "repos"
    (repos / "r").mkdir(parents=True)
    (repos / "r" / "a.py").write_text("x = '<file_sep>'  # <fim_prefix>\n")
    (repos / "r" / "b.py").write_text("y = '<|endoftext|>'\n")
    assert cli_main(_pre(world, repos, tmp_path / "r")) == 0
    ids = IndexedDataset(tmp_path / "r_text_document").document(0).tolist()
    assert ids.count(6) == 2 and ids.count(0) == 1 and ids[-1] == 0
    assert not {1, 2, 3, 4} & set(ids) and ids.count(5) <= 1
    capsys.readouterr()


def _kill_at_step(monkeypatch, crash_at: int) -> None:
    """The pair writer's `crash_at`-th filesystem step (a rename or an unlink) raises as if the
    process were killed there; monkeypatch.undo() restores the real calls."""
    import megatron_sc2.data.indexed as indexed

    calls = {"n": 0}

    def step(real):
        def wrapped(*args, **kwargs):
            if calls["n"] == crash_at:
                raise SystemExit("killed")
            calls["n"] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(indexed.os, "replace", step(os.replace))
    monkeypatch.setattr(indexed.Path, "unlink", step(Path.unlink))


def test_a_crash_between_the_renames_never_leaves_a_mixed_pair(tmp_path, monkeypatch):
    """Kill the writer (an exception nobody catches) at each filesystem step of its finish: the
    prefix then holds the old dataset or no dataset, never a new .bin with an old .idx."""
    from megatron_sc2.errors import DataError

    old_docs, new_docs = [[1, 2, 3]] * 4, [[7, 8]] * 6
    outcomes = set()
    for crash_at in range(4):
        prefix = tmp_path / f"p{crash_at}"
        write_documents(prefix, old_docs, np.uint16)
        _kill_at_step(monkeypatch, crash_at)
        w = IndexedWriter(prefix, np.uint16)
        for doc in new_docs:
            w.add_document(doc)
        try:
            w._finalize()  # no clean-up: a killed process runs none
        except SystemExit:
            pass
        monkeypatch.undo()
        try:
            got = [IndexedDataset(prefix).document(i).tolist() for i in range(IndexedDataset(prefix).num_documents)]
        except DataError as e:
            assert "missing" in str(e)
            outcomes.add("none")
            continue
        assert got in (old_docs, new_docs)
        outcomes.add("old" if got == old_docs else "new")
    assert outcomes == {"old", "none", "new"}


def test_a_crash_never_leaves_a_sidecar_beside_another_pair(tmp_path, monkeypatch):
    """The provenance sidecar is replaced in the pair's own window: killed at any step, a
    readable dataset has its own sidecar (same document count on purpose: only the records
    tell the two apart)."""
    from megatron_sc2.data.provenance import ProvenanceWriter, open_provenance
    from megatron_sc2.errors import DataError

    def write(prefix, docs, tag, crash_at=None):
        pw = ProvenanceWriter(prefix)
        w = IndexedWriter(prefix, np.uint16, companions=[pw])
        for doc in docs:
            w.add_document(doc)
            pw.add({"source": tag})
        w._finalize()  # no clean-up: a killed process runs none

    old_docs, new_docs = [[1, 2, 3]] * 4, [[7, 8]] * 4
    outcomes = set()
    for crash_at in range(5):
        prefix = tmp_path / f"p{crash_at}"
        write(prefix, old_docs, "old")
        _kill_at_step(monkeypatch, crash_at)
        try:
            write(prefix, new_docs, "new")
        except SystemExit:
            pass
        monkeypatch.undo()
        try:
            ds = IndexedDataset(prefix)
        except DataError:
            outcomes.add("none")
            continue
        got = [ds.document(i).tolist() for i in range(ds.num_documents)]
        tags = {open_provenance(prefix, ds.num_documents).record(d)["source"] for d in range(ds.num_documents)}
        assert (got, tags) in ((old_docs, {"old"}), (new_docs, {"new"}))
        outcomes.add("old" if got == old_docs else "new")
    assert outcomes == {"old", "none", "new"}


def test_corrupt_cached_sample_index_is_rebuilt(tmp_path, capsys):
    """A cached shuffle index overwritten with other values (same shape, same dtype) is caught
    by its checksum and rebuilt; the samples equal those built without any cache."""
    from megatron_sc2.data.gpt_dataset import SampleSpec, build_indices, load_or_build_indices

    prefix = tmp_path / "d"
    write_documents(prefix, [list(range(i % 7 + 3)) for i in range(200)], np.uint16)
    ds = IndexedDataset(prefix)
    spec = SampleSpec(prefix=str(prefix), split_name="train", doc_begin=0, doc_end=200, num_samples=40,
                      seq_length=8, seed=5)
    want = build_indices(ds.sequence_lengths, spec)
    cache = tmp_path / "cache"
    first = load_or_build_indices(ds, spec, cache)
    assert all(np.array_equal(a, b) for a, b in zip(first, want))
    shuffle = next(cache.glob("*-shuffle_index.npy"))
    arr = np.load(shuffle)
    np.save(shuffle, arr[::-1].copy())  # other values, same shape and dtype: looks valid
    capsys.readouterr()
    again = load_or_build_indices(ds, spec, cache)
    assert all(np.array_equal(a, b) for a, b in zip(again, want))
    assert "rebuilding" in capsys.readouterr().err
    assert np.array_equal(np.load(shuffle), want[2])  # and the cache entry was rewritten
    shuffle.write_bytes(b"garbage")
    assert all(np.array_equal(a, b) for a, b in zip(load_or_build_indices(ds, spec, cache), want))


def test_old_rng_files_still_load_without_pickle_execution(tmp_path):
    """RNG files of checkpoints written before this change (numpy state as a pickled tuple)
    load through weights_only with numpy's array reconstruction admitted, nothing else."""
    import torch

    from megatron_sc2.errors import CheckpointError
    from megatron_sc2.training import checkpoint as ckpt

    (tmp_path / "iter_0000001" / "rng").mkdir(parents=True)
    f = tmp_path / "iter_0000001" / "rng" / "rank_0.pt"
    np.random.seed(3)
    torch.manual_seed(3)
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state()}, f)
    want = (np.random.rand(3), torch.rand(3))
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.load_rng_state(f)
    got = (np.random.rand(3), torch.rand(3))
    assert np.array_equal(want[0], got[0]) and torch.equal(want[1], got[1])
    ckpt.save_rng_state(f)  # the new format round-trips too
    want = (np.random.rand(3), torch.rand(3))
    ckpt.load_rng_state(f)
    got = (np.random.rand(3), torch.rand(3))
    assert np.array_equal(want[0], got[0]) and torch.equal(want[1], got[1])
    torch.save({"torch": Payload(tmp_path / "PWNED")}, f)
    with pytest.raises(CheckpointError, match="rank_0.pt"):
        ckpt.load_rng_state(f)
    assert not (tmp_path / "PWNED").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (disk full) and a read-only one: root only; skips with the reason."""
    if os.geteuid() != 0:
        pytest.skip("disk-full and read-only cases mount a small tmpfs, which needs root")
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    mounted = []
    for path, opts in ((full, "size=256k"), (ro, "size=64k,ro")):
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode:
            for m in mounted:
                subprocess.run(["umount", "-l", str(m)])
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
        mounted.append(path)
    yield full, ro
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)])


def test_disk_full_and_read_only_end_in_one_line(world, tmp_path, small_disk, capsys, monkeypatch):
    """Preprocess, a checkpoint save and both converters on a full disk and on a read-only one:
    exit status 2, one line, and no file left behind (temporaries removed; the disk is free)."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    full, ro = small_disk
    big = _jsonl(tmp_path / "big.jsonl", [{"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 20}
                                          for i in range(600)])
    assert cli_main(["convert", "to-hf", "--load", str(world.ckpt), "--save", str(tmp_path / "hf"),
                     "--no-progress"]) == 0
    cases = {
        "preprocess": _pre(world, big, full / "out"),
        "train save": _train("--mock-data", "--train-iters", "1", "--save-interval", "1", "--save", str(full / "ck"),
                             "--log-dir", str(tmp_path / "logs")),
        "train async save": _train("--mock-data", "--train-iters", "1", "--save-interval", "1", "--async-save",
                                   "--save", str(full / "cka"), "--log-dir", str(tmp_path / "logs3")),
        "to-hf": ["convert", "to-hf", "--load", str(world.ckpt), "--save", str(full / "hf"), "--no-progress"],
        "from-hf": ["convert", "from-hf", "--load", str(tmp_path / "hf"), "--save", str(full / "ck2"),
                    "--no-progress"],
        "preprocess read-only": _pre(world, big, ro / "out"),
        "train save read-only": _train("--mock-data", "--train-iters", "1", "--save-interval", "1",
                                       "--save", str(ro / "ck"), "--log-dir", str(tmp_path / "logs2")),
        "to-hf read-only": ["convert", "to-hf", "--load", str(world.ckpt), "--save", str(ro / "hf"),
                            "--no-progress"],
    }
    failures = []
    for name, argv in cases.items():
        capsys.readouterr()
        try:
            rc = cli_main(argv)
        except BaseException as e:  # noqa: BLE001
            rc = f"raised {type(e).__name__}: {e}"
        err = capsys.readouterr().err.strip()
        left = [str(p.relative_to(tmp_path)) for root in (full, ro) for p in root.rglob("*") if p.is_file()]
        if rc != 2 or len(err.splitlines()) != 1 or "Traceback" in err or left:
            failures.append(f"{name}: exit {rc}, left {left[:3]} | {err[:300]}")
        if "read-only" in name and "Read-only file system" not in err:
            failures.append(f"{name}: does not say the disk is read-only | {err[:200]}")
        if "read-only" not in name and "No space left" not in err:
            failures.append(f"{name}: does not say the disk is full | {err[:200]}")
        for p in sorted(full.rglob("*"), reverse=True):  # empty directories may stay; clear them
            p.rmdir() if p.is_dir() else p.unlink()
    assert not failures, "\n".join(failures)


def test_fast_encoder_keeps_special_text_as_text_id_for_id(starcoder2_tokenizer_path):
    """The exact fast encoder with special-token text as text equals `tokenizers` with its own
    `encode_special_tokens` switch, on stdlib files and on texts full of special-token text."""
    from tokenizers import Tokenizer as HF

    from megatron_sc2.data.prep.corpus import iter_stdlib_repositories
    from megatron_sc2.data.special_tokens import STARCODER2_SPECIAL_TOKENS
    from megatron_sc2.data.tokenizer import load_tokenizer

    tok = load_tokenizer(starcoder2_tokenizer_path)
    fast = tok.fast_encoder()
    assert fast is not None
    plain = HF.from_file(str(starcoder2_tokenizer_path))
    plain.encode_special_tokens = True
    texts = [t for _, files in list(iter_stdlib_repositories())[:40] for _, t in files][:300]
    texts += [f"x{tok_}y {tok_}\n{tok_}{tok_} 12{tok_}" for tok_ in STARCODER2_SPECIAL_TOKENS]
    texts += ["".join(STARCODER2_SPECIAL_TOKENS), "<|endoftext|>", "<fim_middle", "é\u00ff<NAME>\U0001F600"]
    want = [e.ids for e in plain.encode_batch_fast(texts, add_special_tokens=False)]
    assert fast.encode_batch(texts, parse_special=False) == want
    assert not any(set(ids) & set(range(38)) for ids in want[300:])


def test_skip_malformed_counts_what_it_skips(world, tmp_path, capsys):
    recs = [{"text": "ok = 1\n"}, {"text": ["a", 3]}, {"text": {"x": 1}}, '{"text": ' + "[" * 9999, {"t": "x"}]
    assert cli_main(_pre(world, _jsonl(tmp_path / "in.jsonl", recs), tmp_path / "out", "--skip-malformed")) == 0
    assert "malformed lines 4" in capsys.readouterr().err
    assert IndexedDataset(tmp_path / "out_text_document").num_documents == 1
