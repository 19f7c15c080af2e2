"""Which evaluation problems the training data contains: each HumanEval problem's prompt and
canonical solution queried against a membership portrait (megatron_sc2/governance/portrait.py,
Data Portraits' test).

A text counts as seen when its score (longest chain of 50-character windows found in the
training data, over the chain a fully contained text would give) reaches `threshold`; texts
shorter than one window (49 characters after normalization) cannot be tested and are listed as
such. The infilling sets are built from the same problems, so the report is per problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from megatron_sc2.errors import ConfigError

DEFAULT_THRESHOLD = 0.5


def check_portrait(portrait_dir: str | Path) -> Path:
    """The portrait's filter file; refused (naming the flag) before any evaluation work."""
    from megatron_sc2.governance.portrait import filter_path

    path = filter_path(portrait_dir)
    if not path.is_file():
        raise ConfigError(f"--portrait {portrait_dir}: no {path.name} (build one with `megatron-sc2 portrait build`)")
    return path


def contamination_report(portrait_dir: str | Path, problem_ids: Iterable[str],
                         threshold: float = DEFAULT_THRESHOLD) -> dict:
    from megatron_sc2.eval.tasks import load_problems
    from megatron_sc2.governance.bloom import BloomFilter
    from megatron_sc2.governance.portrait import query_text

    if not 0 < threshold <= 1:
        raise ConfigError(f"--contamination-threshold must be in (0, 1], got {threshold}")
    bf = BloomFilter.open(check_portrait(portrait_dir))
    problems = load_problems()
    ids = list(dict.fromkeys(problem_ids))
    seen_prompts, seen_solutions, untestable, scores = [], [], [], {}
    for pid in ids:
        p = problems[pid]
        row = {}
        for what, text, seen in (("prompt", p["prompt"], seen_prompts),
                                 ("canonical_solution", p["canonical_solution"], seen_solutions)):
            r = query_text(bf, text)
            if r.windows == 0:
                untestable.append(f"{pid} {what}")
                continue
            row[what] = round(r.score, 4)
            if r.score >= threshold:
                seen.append(pid)
        scores[pid] = row
    return {"portrait": str(Path(portrait_dir).resolve()), "threshold": threshold, "problems": len(ids),
            "prompts_in_training_data": seen_prompts, "solutions_in_training_data": seen_solutions,
            "untestable": untestable, "scores": scores}
