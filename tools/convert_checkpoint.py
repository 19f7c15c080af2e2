#!/usr/bin/env python
"""Convert StarCoder2 checkpoints to and from Hugging Face format.

    python tools/convert_checkpoint.py to-hf --load CKPT --save HF_DIR [--dtype bf16]
    python tools/convert_checkpoint.py from-hf --load HF_DIR --save CKPT

The same as `megatron-sc2 convert ...`; see `--help` of each direction.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_sc2.cli import run_user_main  # noqa: E402
from megatron_sc2.convert.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_user_main(main, sys.argv[1:], prog="convert_checkpoint.py"))
