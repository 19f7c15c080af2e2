#!/usr/bin/env python
"""Megatron's script name: `python tools/preprocess_data.py --input IN --output-prefix OUT
--tokenizer-model TOK [--json-keys text] [--append-eod] [--workers N]` (see
`megatron-sc2 preprocess --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_sc2.cli import run_user_main  # noqa: E402
from megatron_sc2.preprocess_command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_user_main(main, sys.argv[1:], prog="preprocess_data.py"))
