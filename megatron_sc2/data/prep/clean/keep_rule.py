"""StarCoder2's rule for which copy of a duplicated file survives: permissive licence over no
licence over any other, then more stars, more forks, the latest revision date; where the columns
are missing (or tie) the file seen first in the input order (smallest uid) -- deterministic in
any sharding."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np

from megatron_sc2.data.prep.clean.filters import license_type

_LICENSE_RANK = {"permissive": 0, "no_license": 1}
_STARS = ("star_events_count", "stars", "max_stars_count", "stars_count")
_FORKS = ("fork_events_count", "forks", "max_forks_count", "forks_count")
_DATES = ("revision_date", "committer_date", "commit_date", "last_modified")

KEY_FIELDS = ("license_rank", "stars", "forks", "revision")


def _number(record: dict[str, Any], names: tuple[str, ...]) -> int:
    for n in names:
        v = record.get(n)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            return int(v)
    return 0


def _date(record: dict[str, Any]) -> int:
    for n in _DATES:
        v = record.get(n)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return int(v)
        if isinstance(v, str) and v:
            try:
                return int(datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp())
            except ValueError:
                continue
    return 0


def keep_key(record: dict[str, Any]) -> tuple[int, int, int, int]:
    """(licence rank, stars, forks, revision time); see `order`."""
    return (_LICENSE_RANK.get(license_type(record), 2), _number(record, _STARS), _number(record, _FORKS),
            _date(record))


def order(uid: np.ndarray, keys: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Indices sorting rows by group, then best to keep first: licence rank ascending, stars,
    forks and revision descending, uid ascending."""
    return np.lexsort((uid, -keys[:, 3], -keys[:, 2], -keys[:, 1], keys[:, 0], groups))


def keepers(uid: np.ndarray, keys: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """For each row, the uid of the row its group keeps (by `order`), or -1 for the kept rows
    themselves: what exact and near dedup both report."""
    n = uid.size
    keeper = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return keeper
    idx = order(uid, keys, groups)
    g = groups[idx]
    first = np.ones(n, dtype=bool)
    first[1:] = g[1:] != g[:-1]
    head = idx[np.maximum.accumulate(np.where(first, np.arange(n), 0))]
    dup = ~first
    keeper[idx[dup]] = uid[head[dup]]
    return keeper
