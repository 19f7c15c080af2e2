#!/usr/bin/env python
"""Megatron's script name: `python tools/merge_datasets.py --input DIR --output-prefix OUT`
or `--inputs P1 P2 ...` (see `megatron-sc2 merge --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_sc2.cli import run_user_main  # noqa: E402
from megatron_sc2.data.prep.merge import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_user_main(main, sys.argv[1:], prog="merge_datasets.py"))
