"""`megatron-sc2 <command>`: one entry point, each command a module with `main(argv)`.

Commands are imported lazily so that `megatron-sc2 preprocess` does not pay for importing
torch or megatron-core. A `UserError` (bad input, impossible setting) prints one line and
exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from megatron_sc2.errors import run_user_main

COMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": ("megatron_sc2.preprocess_command", "tokenize a corpus into Megatron .bin/.idx"),
    "train-tokenizer": ("megatron_sc2.data.prep.train_tokenizer", "train a byte-level BPE tokenizer with StarCoder2's special tokens"),
    "clean": ("megatron_sc2.data.prep.clean.main", "near/exact dedup, PII redaction, decontamination, licence/language filters"),
    "merge": ("megatron_sc2.data.prep.merge", "merge several .bin/.idx datasets into one"),
    "inspect": ("megatron_sc2.data.prep.inspect", "summarize a .bin/.idx dataset and decode documents"),
    "train": ("megatron_sc2.train_command", "train StarCoder2 (single process, torchrun or srun)"),
    "convert": ("megatron_sc2.convert.main", "convert checkpoints to and from Hugging Face format"),
    "submit": ("megatron_sc2.launch.submit", "write an sbatch script for a training run and submit it"),
    "portrait": ("megatron_sc2.governance.portrait", "membership test (Data Portraits): build|merge|query|info"),
    "serve": ("megatron_sc2.governance.serve", "HTTP membership server: POST /overlap for the VS Code extension"),
    "search": ("megatron_sc2.governance.search", "corpus search over the tokens: build|merge|count|find"),
    "remove": ("megatron_sc2.governance.remove", "opt-out: a dataset without the listed repositories"),
    "plan": ("megatron_sc2.planning.main", "list the parallel layouts that fit a cluster's GPUs, best first"),
    "eval": ("megatron_sc2.eval.main", "HumanEval pass@k and infilling from a checkpoint or HF directory, sandboxed"),
    "demo": ("megatron_sc2.demo", "the end-to-end CPU demo behind `make demo`"),
}


def _usage() -> str:
    lines = ["usage: megatron-sc2 <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"megatron-sc2: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_user_main(module.main, rest, prog=f"megatron-sc2 {name}")


if __name__ == "__main__":
    sys.exit(main())
