"""`megatron-sc2 submit`: write the sbatch script of a training run next to its logs and submit it.

    megatron-sc2 submit --config FILE --nodes N (--gpus-per-node G | --ntasks-per-node T)
        [--time HH:MM:SS] [--partition P] [--account A] [--job-name J] [--signal USR1@120]
        [--dry-run] [-- extra train flags]
    megatron-sc2 submit clean --shards N --input IN... --output DIR [clean flags] [--dry-run]

The training settings are parsed and checked here, before anything is queued (a layout that does
not divide the job's ranks fails now, not after hours in the queue). The script goes to the run's
log directory (`--log-dir`, else `--save`); `--dry-run` prints it and changes nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from megatron_sc2.config import TrainConfig, parse_signal, parse_train_args
from megatron_sc2.errors import CommandLineParser, ConfigError, UserError
from megatron_sc2.launch.sbatch import JobSpec, render, signal_name


class SubmitError(UserError):
    """sbatch is missing or refused the job."""


def _parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="megatron-sc2 submit", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="training YAML (as for `megatron-sc2 train --config`)")
    p.add_argument("--nodes", type=int, required=True)
    per_node = p.add_mutually_exclusive_group(required=True)
    per_node.add_argument("--gpus-per-node", type=int, help="one task per GPU")
    per_node.add_argument("--ntasks-per-node", type=int, help="CPU job: tasks per node")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--time", help="time limit (HH:MM:SS, D-HH:MM:SS, ...)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name")
    p.add_argument("--signal", default="USR1@120",
                   help="slurm's --signal: SIG@SECONDS before the time limit (default USR1@120)")
    p.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes")
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    return p


@dataclass
class Submission:
    script: str
    script_path: Optional[Path]
    job_id: Optional[str]
    log_pattern: str


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def check_layout(cfg: TrainConfig, world: int) -> str:
    """The TP x CP x PP x DP layout the job's ranks give this config; ConfigError when it cannot work."""
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    cp = cfg.context_parallel_size
    if tp <= 0 or pp <= 0 or cp <= 0:
        raise ConfigError("--tensor-model-parallel-size, --pipeline-model-parallel-size and "
                          "--context-parallel-size must be positive")
    if world % (tp * pp * cp):
        raise ConfigError(
            f"the job has {world} ranks, not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}" + (f" x --context-parallel-size {cp}" if cp > 1 else ""))
    if cfg.seq_length % cp:
        raise ConfigError(f"--context-parallel-size {cp} does not divide --seq-length {cfg.seq_length}")
    dp = world // (tp * pp * cp)
    model = cfg.model_config()
    if model.num_attention_heads % tp:
        raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide the "
                          f"{model.num_attention_heads} attention heads")
    if model.num_layers % pp:
        raise ConfigError(f"--pipeline-model-parallel-size {pp} does not divide the {model.num_layers} layers")
    gbs = cfg.global_batch_size or cfg.micro_batch_size * dp
    if gbs % (cfg.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size x data-parallel size "
            f"({cfg.micro_batch_size} x {dp}, with {world} ranks at TP{tp} x PP{pp} x CP{cp})")
    cps = f" x CP{cp}" if cp > 1 else ""
    return f"TP{tp}{cps} x PP{pp} x DP{dp}, {gbs} sequences per step"


def build(argv: Sequence[str], now: Optional[datetime] = None) -> tuple[JobSpec, TrainConfig, argparse.Namespace]:
    own, extra = _split(argv)
    args = _parser().parse_args(own)
    train_argv: list[str] = []
    if args.config:
        cfg_path = Path(args.config)
        if not cfg_path.is_file():
            raise ConfigError(f"config file not found: {args.config}")
        train_argv += ["--config", str(cfg_path.resolve())]
    elif not extra:
        raise ConfigError("submit: give --config FILE and/or training flags after `--`")
    train_argv += extra
    cfg = parse_train_args(train_argv)

    tasks = args.gpus_per_node if args.gpus_per_node is not None else args.ntasks_per_node
    gpus = args.gpus_per_node or 0
    if args.nodes is None or args.nodes <= 0:
        raise ConfigError(f"--nodes must be positive, got {args.nodes}")
    if tasks is None or tasks <= 0:
        raise ConfigError(f"--{'gpus' if args.gpus_per_node is not None else 'ntasks'}-per-node "
                          f"must be positive, got {tasks}")
    layout = check_layout(cfg, args.nodes * tasks)
    sent = signal_name(args.signal)
    if parse_signal(sent, "--signal") != parse_signal(cfg.exit_signal):
        raise ConfigError(f"--signal {args.signal} sends SIG{sent} but the training run saves and "
                          f"requeues on --exit-signal {cfg.exit_signal}; make them the same")

    log_dir = cfg.log_dir or cfg.save
    if not log_dir:
        raise ConfigError("submit: set --save (where a requeued job resumes from) or --log-dir "
                          "(where the script and slurm's output go)")
    log_dir_abs = str(Path(log_dir).resolve())
    job_name = args.job_name or (Path(args.config).stem if args.config else "starcoder2")

    command = [args.python, "-m", "megatron_sc2.cli", "train", *train_argv]
    resume_dir = str(Path(cfg.save).resolve()) if cfg.save else None
    initial_load = None
    if cfg.save and not cfg.load:
        command += ["--load", cfg.save]  # a requeued run finds its own checkpoints
    elif cfg.save and cfg.load and Path(cfg.load).resolve() != Path(cfg.save).resolve():
        initial_load = cfg.load
    spec = JobSpec(
        nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=gpus, cpus_per_task=args.cpus_per_task,
        time=args.time, partition=args.partition, account=args.account, job_name=job_name,
        signal=args.signal, output=log_dir_abs.replace("%", "%%") + "/slurm-%j.out",
        workdir=os.getcwd(), train_command=command, resume_dir=resume_dir, initial_load=initial_load,
        layout_comment=layout).validate()
    return spec, cfg, args


def submit(argv: Sequence[str]) -> Submission:
    spec, cfg, args = build(argv)
    now = datetime.now(timezone.utc)
    script = render(spec, now)
    log_dir = Path(cfg.log_dir or cfg.save).resolve()
    log_pattern = str(log_dir / "slurm-%j.out")
    if args.dry_run:
        return Submission(script, None, None, log_pattern)
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch not found on PATH (is slurm installed here?); use --dry-run to see the script")
    log_dir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.job_name).strip("_") or "job"
    path = log_dir / f"{safe}-{now:%Y%m%d-%H%M%S}.sbatch"
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(script)
    tmp.chmod(0o755)
    os.replace(tmp, path)
    out = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().replace("\n", " ")
        raise SubmitError(f"sbatch refused {path}: {msg}")
    job_id = out.stdout.strip().split(";")[0]
    return Submission(script, path, job_id, log_pattern)


def submit_clean(argv: Sequence[str]) -> int:
    """`megatron-sc2 submit clean --shards N [clean flags]`: the clean's job chain (a job array of
    N shards and a dependent merge job), as `megatron-sc2 clean ... --slurm N` writes it."""
    from megatron_sc2.data.prep.clean.main import main as clean_main

    argv = list(argv)
    shards = None
    for i, a in enumerate(argv):
        if a == "--shards" and i + 1 < len(argv):
            shards = argv[i + 1]
            del argv[i:i + 2]
            break
        if a.startswith("--shards="):
            shards = a.split("=", 1)[1]
            del argv[i]
            break
    if shards is None or not shards.isdigit() or int(shards) < 1:
        raise ConfigError("submit clean: give --shards N (N >= 1), then the clean flags")
    return clean_main([*argv, "--slurm", shards])


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "clean":
        return submit_clean(argv[1:])
    result = submit(argv)
    if result.job_id is None:
        sys.stdout.write(result.script)
        return 0
    print(f"submitted job {result.job_id}\n  script: {result.script_path}\n"
          f"  log:    {result.log_pattern.replace('%j', result.job_id)}")
    return 0
