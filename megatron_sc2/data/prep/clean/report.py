"""report.json: counts per stage and reason (adding up to the files read), examples of each
removal, the stages run, and each step's time and peak memory."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

from megatron_sc2.data.prep.clean.settings import CleanConfig, shard_dir

EXAMPLES = 5


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def build_report(cfg: CleanConfig, n: int, entries: list[dict[str, Any]], kept: int, clusters: int,
            merge_seconds: float) -> dict[str, Any]:
    read = Counter()
    files_in = 0
    shard_rss, shard_seconds = [], []
    for i in range(n):
        s = json.loads((shard_dir(cfg, i, n) / "stats.json").read_text())
        files_in += s["files"]
        shard_rss.append(s.get("peak_rss_mb", 0.0))
        shard_seconds.append(s.get("seconds", 0.0))
        for k, v in s["read"].items():
            # where every shard reads every input, what reading counts (files, bytes, malformed
            # lines, ...) is the same in each: taken once; empty documents are per record
            if not s.get("reads_all") or i == 0 or k == "empty_documents":
                read[k] += v
    removed: dict[str, Counter] = defaultdict(Counter)
    redacted: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    redacted_files = 0
    for e in entries:
        key = f"{e['stage']}/{e['reason']}"
        if e["action"] == "removed":
            removed[e["stage"]][e["reason"]] += 1
        else:
            redacted_files += 1
            for kind, c in e.get("detail", {}).items():
                redacted[kind] += c
        if len(examples[key]) < EXAMPLES:
            examples[key].append(e["where"])
    total_removed = sum(sum(c.values()) for c in removed.values())
    return {
        "input": {"files": files_in, **dict(read)},
        "output": {"files": kept, "shards": n},
        "removed": {stage: dict(c) for stage, c in sorted(removed.items())},
        "removed_total": total_removed,
        "redacted": {"files": redacted_files, **dict(redacted)},
        "near_dedup_clusters": clusters,
        "stages": {"exact_dedup": cfg.exact_dedup or cfg.near_dedup, "near_dedup": cfg.near_dedup,
                   "pii": cfg.pii, "decontaminate": cfg.decontaminate, "licenses": cfg.licenses,
                   "languages": cfg.languages, "path_filters": cfg.path_filters},
        "examples": dict(examples),
        "merge_seconds": round(merge_seconds, 3),
        "resources": {"shard_seconds_max": max(shard_seconds), "shardpeak_rss_mb_max": max(shard_rss),
                      "mergepeak_rss_mb": peak_rss_mb()},
    }


def summary_lines(report: dict[str, Any]) -> list[str]:
    r = report
    lines = [f"files: {r['input']['files']:,} in, {r['output']['files']:,} out in {r['output']['shards']} "
             f"shard(s); removed {r['removed_total']:,}"]
    for stage, reasons in r["removed"].items():
        lines.append(f"  {stage}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items())))
    red = {k: v for k, v in r["redacted"].items() if k != "files"}
    if r["redacted"]["files"]:
        lines.append(f"  pii: {r['redacted']['files']:,} files redacted (" +
                     ", ".join(f"{k} {v:,}" for k, v in sorted(red.items())) + ")")
    return lines
