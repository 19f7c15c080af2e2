"""`megatron-sc2 train --config FILE [--flag value ...]`."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_sc2.config import parse_train_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_train_args(sys.argv[1:] if argv is None else argv)
    from megatron_sc2.training.signals import install_early

    startup = install_early(cfg)  # noqa: F841 - stop signals during start-up wait for step 1
    from megatron_sc2.parallel.failures import collective_failures
    from megatron_sc2.training.trainer import train

    with collective_failures():  # a dead or hung peer: one line naming this rank, exit 2
        train(cfg)
    return 0
