"""`megatron-sc2 preprocess` / `tools/preprocess_data.py`: the data tool's flags
(`megatron_sc2.data.prep.preprocess`) plus `--portrait DIR`, which also writes the membership
portrait of the documents written, read once with the corpus. It lives up here because the
portrait (governance/) sits above the data layer; without the flag governance is not imported.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_sc2.data.prep.preprocess import build_parser as data_parser
from megatron_sc2.data.prep.preprocess import run


def build_parser():
    p = data_parser()
    g = p.add_argument_group("membership portrait (off by default)")
    g.add_argument("--portrait", default=None, metavar="DIR",
                   help="also write DIR/portrait.bloom, byte for byte what `megatron-sc2 portrait build "
                        "--data-path OUTPUT_PREFIX_text_document --output DIR` makes from the finished dataset")
    g.add_argument("--portrait-error-rate", type=float, default=0.001,
                   help="its false-positive rate at capacity (as `portrait build --error-rate`)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    observers = []
    if args.portrait is not None:
        from megatron_sc2.governance.portrait import PreprocessPortrait

        observers.append(PreprocessPortrait(args.portrait, args.portrait_error_rate))
    rc = run(args, observers)
    for o in observers:
        print(f"wrote {o.path} ({o.windows:,} windows, capacity {o.capacity:,}, "
              f"error rate {o.error_rate:g})", file=sys.stderr)
    return rc
