"""Launch environment and sbatch scripts, without a cluster: rank/world/master from torchrun's or
slurm's variables; `megatron-sc2 submit --dry-run` scripts and examples/slurm/*.sbatch executed by
bash with stand-in `srun`/`scontrol`/`sbatch` that record what they were asked to run, so the
flags checked are the ones the shell really passes."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from megatron_sc2 import cli
from megatron_sc2.config import parse_train_args
from megatron_sc2.errors import ConfigError
from megatron_sc2.parallel.env import detect, first_host
from megatron_sc2.launch.submit import build, check_layout, submit

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "slurm"


# ---------------------------------------------------------------------------------- launch env

def test_torchrun_variables_win():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    e = detect(env)
    assert (e.rank, e.local_rank, e.world_size, e.master_addr, e.master_port, e.source) == \
        (3, 1, 8, "n1", 1234, "torchrun")


def test_srun_step_variables(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: our own node-list parsing
    env = {"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16",
           "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"}
    e = detect(env)
    assert (e.rank, e.local_rank, e.world_size, e.master_addr, e.source) == (13, 5, 16, "gpu007", "slurm")
    assert e.master_port == 20000 + 123456 % 20000
    assert detect({**env, "MASTER_PORT": "29999", "MASTER_ADDR": "10.0.0.1"}).master_port == 29999
    # The batch script itself (no srun step) is one process, whatever the job's task count.
    batch = {k: v for k, v in env.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert detect(batch).world_size == 1 and detect(batch).source == "single"
    assert detect({}).world_size == 1


@pytest.mark.parametrize("nodelist,first", [
    ("node[003-005,7],gpu1", "node003"), ("a1", "a1"), ("x-[10,12]", "x-10"), ("h[1-2],g[3-4]", "h1")])
def test_first_host_without_scontrol(monkeypatch, nodelist, first):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert first_host(nodelist) == first


def test_export_sets_env_rendezvous(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.setenv(k, "x")  # recorded, so export()'s values are undone after the test
        monkeypatch.delenv(k)
    monkeypatch.setenv("PATH", "/nonexistent")
    detect({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]",
            "SLURM_JOB_ID": "7"}).export()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"],
            os.environ["MASTER_PORT"]) == ("1", "2", "n1", "20007")


# -------------------------------------------------------------------- scripts run by bash

def _stand_ins(tmp: Path) -> Path:
    """A bin dir with `srun` that records its argv (one shell word per line) and `scontrol`."""
    bin_ = tmp / "bin"
    bin_.mkdir(exist_ok=True)
    (bin_ / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$RECORD"\n')
    (bin_ / "scontrol").write_text('#!/bin/bash\necho node001\n')
    (bin_ / "sbatch").write_text('#!/bin/bash\ncp "${@: -1}" "$RECORD.script"\necho "4242;cluster"\n')
    for f in bin_.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_


def _run_script(script: Path, tmp: Path) -> list[str]:
    """Execute an sbatch script with the stand-ins; return the argv `srun` received."""
    bin_ = _stand_ins(tmp)
    record = tmp / "srun-argv"
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "RECORD": str(record), "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "node[001-004]", "SLURM_SUBMIT_DIR": str(tmp), "HOME": str(tmp)}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp)
    assert out.returncode == 0, out.stderr
    return record.read_text().split("\n")[:-1]


def _directives(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"#SBATCH --([\w-]+)(?:=(.*))?$", line)
        if m:
            out[m.group(1)] = (m.group(2) or "").strip('"')
    return out


def _train_argv(srun_argv: list[str]) -> list[str]:
    assert "--kill-on-bad-exit=1" in srun_argv
    return srun_argv[srun_argv.index("train") + 1:]


def test_dry_run_15b_script_has_the_right_allocation_and_flags(tmp_path, capsys):
    cfg = tmp_path / "sc2-15b.yaml"
    cfg.write_text("model: starcoder2-15b\nseq-length: 4096\nmicro-batch-size: 1\nglobal-batch-size: 1024\n"
                   "tensor-model-parallel-size: 4\npipeline-model-parallel-size: 2\nsequence-parallel: true\n"
                   f"bf16: true\nmock-data: true\nsave: {tmp_path / 'ckpt'}\n")
    assert cli.main(["submit", "--config", str(cfg), "--nodes", "4", "--gpus-per-node", "8",
                     "--time", "1-12:00:00", "--partition", "h100", "--account", "proj",
                     "--dry-run", "--", "--train-iters", "500", "--lr", "2e-4"]) == 0
    text = capsys.readouterr().out
    d = _directives(text)
    assert d["nodes"] == "4" and d["ntasks-per-node"] == "8" and d["gpus-per-node"] == "8"
    assert d["time"] == "1-12:00:00" and d["partition"] == "h100" and d["account"] == "proj"
    assert d["signal"] == "USR1@120" and "requeue" in d and d["open-mode"] == "append"
    assert d["job-name"] == "sc2-15b"
    assert d["output"] == str(tmp_path / "ckpt" / "slurm-%j.out")
    assert "TP4 x PP2 x DP4" in text
    assert not (tmp_path / "ckpt").exists()  # a dry run writes nothing

    script = tmp_path / "s.sbatch"
    script.write_text(text)
    train = _train_argv(_run_script(script, tmp_path))
    got = parse_train_args(train)
    assert got.model == "starcoder2-15b" and got.tensor_model_parallel_size == 4
    assert got.pipeline_model_parallel_size == 2 and got.sequence_parallel and got.bf16
    assert got.global_batch_size == 1024 and got.train_iters == 500 and got.lr == 2e-4
    assert got.save == got.load == str(tmp_path / "ckpt")  # a requeued run resumes from --save
    assert check_layout(got, 4 * 8).startswith("TP4 x PP2 x DP4")


def test_names_and_paths_stay_literal(tmp_path):
    """Spaces, quotes and $(...) in the job name, paths and flags reach slurm and the trainer as
    typed, and nothing is executed."""
    save = tmp_path / "run $(touch PWNED) it's"
    name = "my job $(touch PWNED2) `id`"
    argv = ["--nodes", "1", "--ntasks-per-node", "2", "--job-name", name, "--dry-run", "--",
            "--mock-data", "--model", "starcoder2-tiny", "--global-batch-size", "4", "--save", str(save),
            "--data-cache-path", "$HOME/x; rm -rf /"]
    spec, cfg, _ = build(argv)
    result = submit(argv)
    script = tmp_path / "s.sbatch"
    script.write_text(result.script)
    train = _train_argv(_run_script(script, tmp_path))
    assert parse_train_args(train) == dataclasses.replace(cfg, load=str(save))  # + resume from --save
    assert cfg.save == str(save) and cfg.data_cache_path == "$HOME/x; rm -rf /"
    assert not list(tmp_path.rglob("PWNED*"))
    assert _directives(result.script)["job-name"] == name


def test_submit_writes_script_next_to_logs_and_parses_job_id(tmp_path, monkeypatch, capsys):
    bin_ = _stand_ins(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(tmp_path / "rec"))
    logs = tmp_path / "logs"
    assert cli.main(["submit", "--nodes", "2", "--ntasks-per-node", "2", "--job-name", "tiny run",
                     "--", "--mock-data", "--model", "starcoder2-tiny", "--global-batch-size", "8",
                     "--save", str(tmp_path / "ck"), "--log-dir", str(logs)]) == 0
    out = capsys.readouterr().out
    assert "submitted job 4242" in out and str(logs / "slurm-4242.out") in out
    scripts = list(logs.glob("tiny_run-*.sbatch"))
    assert len(scripts) == 1 and not list(logs.glob("*.tmp-*"))
    assert scripts[0].read_text() == (tmp_path / "rec.script").read_text()


def test_first_load_then_resume_from_save(tmp_path):
    """--load of a pretrained checkpoint for the first run; a requeued run resumes from --save."""
    argv = ["--nodes", "1", "--ntasks-per-node", "1", "--dry-run", "--", "--mock-data", "--model",
            "starcoder2-tiny", "--load", str(tmp_path / "pretrained"), "--finetune",
            "--save", str(tmp_path / "ck")]
    script = tmp_path / "s.sbatch"
    script.write_text(submit(argv).script)
    first = parse_train_args(_train_argv(_run_script(script, tmp_path)))
    assert first.load == str(tmp_path / "pretrained") and first.finetune
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("10\n")
    again = parse_train_args(_train_argv(_run_script(script, tmp_path)))
    assert again.load == str(tmp_path / "ck") and not again.finetune


@pytest.mark.parametrize("args,expect", [
    (["--nodes", "1", "--gpus-per-node", "6", "--", "--tensor-model-parallel-size", "4"],
     "6 ranks, not divisible by --tensor-model-parallel-size 4"),
    (["--nodes", "1", "--ntasks-per-node", "2", "--", "--pipeline-model-parallel-size", "2", "--num-layers", "3"],
     "does not divide the 3 layers"),
    (["--nodes", "1", "--ntasks-per-node", "4", "--", "--global-batch-size", "6"], "--global-batch-size 6"),
    (["--nodes", "1", "--ntasks-per-node", "1", "--signal", "USR2@60", "--"], "--exit-signal SIGUSR1"),
    (["--nodes", "1", "--ntasks-per-node", "1", "--signal", "B:USR1@60", "--"], "B: prefix"),
    (["--nodes", "1", "--ntasks-per-node", "1", "--time", "1h", "--"], "--time '1h'"),
    (["--nodes", "1", "--ntasks-per-node", "1", "--time", "00:01:30", "--"], "comes before"),
    (["--nodes", "0", "--ntasks-per-node", "1", "--"], "--nodes must be positive"),
    (["--nodes", "1", "--gpus-per-node", "1", "--ntasks-per-node", "1", "--"], "not allowed with"),
    (["--nodes", "1", "--ntasks-per-node", "1", "--job-name", 'a"b', "--"], "double quote"),
    (["--nodes", "1", "--ntasks-per-node", "1", "--", "--no-such-flag", "1"], "unknown argument"),
    (["--config", "/nonexistent.yaml", "--nodes", "1", "--ntasks-per-node", "1"], "config file not found"),
])
def test_bad_submissions_are_one_line_errors(tmp_path, capsys, args, expect):
    if "--" in args:
        i = args.index("--")
        args = args[:i + 1] + ["--mock-data", "--model", "starcoder2-tiny", "--save", str(tmp_path)] + args[i + 1:]
    assert cli.main(["submit", "--dry-run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err


def test_no_save_or_log_dir_is_refused(capsys):
    assert cli.main(["submit", "--nodes", "1", "--ntasks-per-node", "1", "--", "--mock-data"]) == 2
    assert "--save" in capsys.readouterr().err


# ------------------------------------------------------------------------------ examples

@pytest.mark.parametrize("name,model,tp,pp", [("starcoder2-3b", "starcoder2-3b", 2, 1),
                                              ("starcoder2-7b", "starcoder2-7b", 4, 1),
                                              ("starcoder2-15b", "starcoder2-15b", 4, 2)])
def test_example_sbatch_scripts(tmp_path, name, model, tp, pp):
    script = EXAMPLES / f"{name}.sbatch"
    text = script.read_text()
    d = _directives(text)
    nodes, tasks, gpus = int(d["nodes"]), int(d["ntasks-per-node"]), int(d["gpus-per-node"])
    assert tasks == gpus == 8 and "requeue" in d and d["signal"].startswith("USR1@")
    cfg = parse_train_args(_train_argv(_run_script(script, tmp_path)))
    assert (cfg.model, cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (model, tp, pp)
    assert cfg.save == cfg.load and cfg.exit_signal.upper().endswith(d["signal"].split("@")[0])
    check_layout(cfg, nodes * gpus)  # raises when the layout does not fit the allocation
    m = cfg.model_config()
    assert m.num_attention_heads % tp == 0 and m.num_layers % pp == 0
    assert "What to change" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


# ------------------------------------------------------------------------- rank failures

def test_peer_failures_become_one_line_naming_the_rank(monkeypatch, capsys):
    from megatron_sc2.cli import run_user_main
    from megatron_sc2.parallel.failures import RankFailure, collective_failures

    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RankFailure, match=r"rank 3 of 4: a collective .* \(Connection closed by peer"):
        with collective_failures():
            raise RuntimeError("[/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:1")

    def timed_out(argv):
        with collective_failures():
            import torch.distributed as dist

            raise dist.DistBackendError("Timed out waiting 15000ms for recv operation to complete")
    assert run_user_main(timed_out, [], prog="megatron-sc2 train") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rank 3 of 4" in err and "Timed out" in err
    with pytest.raises(ValueError):  # our own bugs keep their traceback
        with collective_failures():
            raise ValueError("not a collective")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError):  # one process: nothing to blame on a peer
        with collective_failures():
            raise RuntimeError("Connection closed by peer")


def test_check_layout_counts_context_parallel_ranks():
    cfg = parse_train_args(["--model", "starcoder2-tiny", "--seq-length", "64",
                            "--tensor-model-parallel-size", "2", "--context-parallel-size", "2"])
    assert check_layout(cfg, 8).startswith("TP2 x CP2 x PP1 x DP2")
    with pytest.raises(ConfigError, match=r"--context-parallel-size 2"):
        check_layout(cfg, 6)
    odd = parse_train_args(["--model", "starcoder2-tiny", "--seq-length", "63",
                            "--context-parallel-size", "2"])
    with pytest.raises(ConfigError, match=r"--context-parallel-size 2 does not divide --seq-length 63"):
        check_layout(odd, 2)
