"""Completions -> sandbox verdicts -> per-sample records and a summary (pass@k, exact match).

Shared by `megatron-sc2 eval` (our generations or `--samples FILE`), the training hook and
the tests, so every path scores the same way.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

from megatron_sc2.errors import ConfigError
from megatron_sc2.eval.passk import mean_pass_at_k
from megatron_sc2.eval.sandbox import PASSED, RunResult, Sandbox
from megatron_sc2.eval.tasks import Task


@dataclass
class SampleRecord:
    """One line of samples.jsonl."""

    task_set: str
    task_id: str
    sample: int
    completion: str
    result: str          # passed | failed | error | timeout
    passed: bool
    exact_match: Optional[bool]  # infilling only
    error: str
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def exact_match(task: Task, completion: str) -> bool:
    """The paper's exact match: the generated middle equals the masked text, ignoring
    whitespace at its two ends."""
    return completion.strip() == task.middle.strip()


def score(tasks: Sequence[Task], completions: Sequence[Sequence[str]], sandbox: Sandbox,
          on_done: Optional[Callable[[], None]] = None) -> list[SampleRecord]:
    """Run every (task, completion) in the sandbox; records in task order, then sample order."""
    if len(tasks) != len(completions):
        raise ValueError("score: one list of completions per task")
    pairs = [(t, j, c) for t, cs in zip(tasks, completions) for j, c in enumerate(cs)]

    def done(_i: int, _r: RunResult) -> None:
        if on_done is not None:
            on_done()

    results = sandbox.run_many([t.program(c) for t, _, c in pairs], on_done=done)
    return [SampleRecord(t.task_set, t.task_id, j, c, r.status, r.status == PASSED,
                         exact_match(t, c) if t.is_infill else None, r.error, round(r.seconds, 3))
            for (t, j, c), r in zip(pairs, results)]


def summarize(task_set: str, records: Sequence[SampleRecord], ks: Sequence[int]) -> dict:
    """pass@k for each requested k (unbiased estimator over problems), exact match for
    infilling, and counts of each verdict."""
    per_task: dict[str, list[SampleRecord]] = defaultdict(list)
    for r in records:
        if r.task_set == task_set:
            per_task[r.task_id].append(r)
    if not per_task:
        raise ConfigError(f"no samples for task {task_set}")
    totals = [len(v) for v in per_task.values()]
    corrects = [sum(r.passed for r in v) for v in per_task.values()]
    n_min = min(totals)
    for k in ks:
        if k > n_min:
            raise ConfigError(f"--k {k} exceeds the samples per problem ({n_min}) for {task_set}; "
                              f"raise --n-samples or lower --k")
    verdicts = Counter(r.result for v in per_task.values() for r in v)
    out = {
        "tasks": len(per_task), "samples": sum(totals), "samples_per_task": n_min,
        "pass@k": {f"pass@{k}": mean_pass_at_k(totals, corrects, k) for k in ks},
        "passed": verdicts.get("passed", 0), "failed": verdicts.get("failed", 0),
        "errors": verdicts.get("error", 0), "timeouts": verdicts.get("timeout", 0),
    }
    ems = [r.exact_match for v in per_task.values() for r in v if r.exact_match is not None]
    if ems:
        out["exact_match"] = sum(ems) / len(ems)
    return out
