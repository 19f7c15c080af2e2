"""The planner's memory model against PyTorch's fake-tensor accounting (MemTracker) of the same
step, at more layouts than tests/test_planner.py: every preset at 4k and 16k, the planner's best
layout without CP/virtual stages and its best with TP. Prints estimate / traced per layout.

    PYTHONPATH=$PWD python bench/plan.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_planner import traced_and_estimated  # noqa: E402

GIB = 2 ** 30
RULES = {"best": lambda l: l.cp == 1 and l.virtual_stages == 1,
         "best with TP": lambda l: l.cp == 1 and l.tp > 1 and l.virtual_stages == 1}

if __name__ == "__main__":
    for model in ("starcoder2-3b", "starcoder2-7b", "starcoder2-15b"):
        for seq in (4096, 16384):
            for name, rule in RULES.items():
                try:
                    lay, est, traced = traced_and_estimated(model, seq, rule)
                    print(f"{model:15} {seq:>6} {name:13} {lay.describe():26} "
                          f"mbs {lay.micro_batch_size} {lay.recompute or '-':9} "
                          f"traced {traced / GIB:6.2f} GiB  estimate {est / GIB:6.2f} GiB  "
                          f"ratio {est / traced:.3f}", flush=True)
                except RuntimeError as e:
                    print(f"{model:15} {seq:>6} {name:13} trace failed: {e}", flush=True)
