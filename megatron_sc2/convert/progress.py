"""A byte-counting progress bar on stderr (tqdm), shown when stderr is a terminal by default."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Optional


class _Silent:
    def update(self, n: int) -> None:
        pass


@contextmanager
def progress_bar(total_bytes: int, desc: str, enabled: Optional[bool] = None) -> Iterator:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield _Silent()
        return
    from tqdm import tqdm

    with tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar
