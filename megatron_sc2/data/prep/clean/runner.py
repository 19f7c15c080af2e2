"""The clean pipeline in two steps, so that it runs as N shards on one machine or on a cluster.

1. `scan_shard(i, N)`: the files of shard i through the per-file stages (licence, language and
   path filters, decontamination, PII redaction), with each survivor's content hash and MinHash
   signature (of the text before redaction). Written to `DIR/.clean-work/shard-i-of-N/` under a
   temporary name and renamed when complete, with the settings' fingerprint: a re-run finds
   finished shards and does not redo them.
2. `merge(N)`: needs every shard; exact dedup over all content hashes, then LSH clustering over
   all signatures (in uid order, so the result does not depend on N), then each shard's
   survivors to `DIR/part-i-of-N.jsonl`, with `report.json` and `manifest.jsonl`.

Limits: with fewer input files than shards every shard reads every input (and skips the
records of other shards), so reading is paid N times (with more files, each reads its own); the
merge is one process holding a few hundred bytes per file (uid, content hash, keep-rule columns,
25 band keys, its location) plus the manifest: tens of GB for 100 million files. Signatures stay on disk (memory-mapped) and are read for candidate pairs only.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megatron_sc2.errors import ConfigError, DataError
from megatron_sc2.data.prep.sources import ReadStats
from megatron_sc2.data.prep.clean import exact_dedup, keep_rule
from megatron_sc2.data.prep.clean import near_dedup as near
from megatron_sc2.data.prep.clean.filters import FileRules
from megatron_sc2.data.prep.clean.minhash import has_shingles
from megatron_sc2.data.prep.clean.records import iter_records, reads_every_input
from megatron_sc2.data.prep.clean.report import peak_rss_mb, build_report
from megatron_sc2.data.prep.clean.settings import CleanConfig, shard_dir, work_dir

def _shard_done(cfg: CleanConfig, i: int, n: int) -> bool:
    stats = shard_dir(cfg, i, n) / "stats.json"
    try:
        return json.loads(stats.read_text())["fingerprint"] == cfg.fingerprint()
    except (OSError, ValueError, KeyError):
        return False


def _entry(rec, action: str, stage: str, reason: str, **detail: Any) -> dict[str, Any]:
    e = {"uid": rec.uid, "where": rec.where, "repo_name": rec.repo, "path": rec.path,
         "action": action, "stage": stage, "reason": reason}
    if detail:
        e["detail"] = detail
    return e


def scan_shard(cfg: CleanConfig, i: int, n: int) -> str:
    """Run shard i of n; "done" or "skipped" (already done with these settings)."""
    if not 0 <= i < n:
        raise ConfigError(f"--shard {i}/{n}: the index must be in 0..{n - 1}")
    if _shard_done(cfg, i, n):
        return "skipped"
    from megatron_sc2.data.prep.clean.minhash import MinHasher
    from megatron_sc2.data.prep.clean.exact_dedup import content_hash

    rules = FileRules(cfg.licenses, cfg.languages, cfg.path_filters)
    decon = None
    if cfg.decontaminate:
        from megatron_sc2.data.prep.clean.decontaminate import Decontaminator
        decon = Decontaminator.build(True, cfg.benchmark_files)
    redact = None
    if cfg.pii:
        from megatron_sc2.data.prep.clean.pii import redact
    hasher = MinHasher(cfg.num_perm, cfg.seed) if cfg.near_dedup else None

    t0 = time.perf_counter()
    final = shard_dir(cfg, i, n)
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats = ReadStats()
    seen = 0
    uids: list[int] = []
    hashes: list[tuple[int, int]] = []
    keys: list[tuple[int, int, int, int]] = []
    sigs: list[np.ndarray] = []
    try:
        with open(tmp / "kept.jsonl", "w", encoding="utf-8") as kept, \
                open(tmp / "index.jsonl", "w", encoding="utf-8") as index, \
                open(tmp / "manifest.jsonl", "w", encoding="utf-8") as manifest:
            for rec in iter_records(cfg.inputs, stats, cfg.text_key, cfg.skip_malformed, i, n):
                text = rec.text
                if not text and rec.repo is None:
                    if not cfg.skip_malformed:
                        raise DataError(f"{rec.where}: empty document (no text to tokenize); "
                                        "pass --skip-malformed to skip such documents")
                    stats.empty_documents += 1
                    continue
                seen += 1
                dropped = rules.reason(rec.record, rec.path, text)
                if dropped:
                    manifest.write(json.dumps(_entry(rec, "removed", dropped[0], dropped[1])) + "\n")
                    continue
                if decon is not None:
                    hit = decon.match(text)
                    if hit is not None:
                        manifest.write(json.dumps(_entry(rec, "removed", "decontaminate", "benchmark",
                                                         benchmark=hit.source)) + "\n")
                        continue
                uids.append(rec.uid)
                hashes.append(content_hash(text))
                keys.append(keep_rule.keep_key(rec.record))
                if hasher is not None:
                    sigs.append(hasher.signature(text))
                if redact is not None:
                    red = redact(text)
                    if red.counts:
                        rec.record[rec.text_key] = red.text
                        manifest.write(json.dumps(_entry(rec, "redacted", "pii", "pii", **red.counts)) + "\n")
                kept.write(json.dumps(rec.record, ensure_ascii=False) + "\n")
                index.write(json.dumps([rec.where, rec.repo, rec.path]) + "\n")
        sig_matrix = np.stack(sigs) if sigs else np.zeros((0, cfg.num_perm), dtype=np.uint32)
        np.savez(tmp / "meta.npz", uid=np.array(uids, dtype=np.int64),
                 hash=np.array(hashes, dtype=np.uint64).reshape(-1, 2),
                 keys=np.array(keys, dtype=np.int64).reshape(-1, 4),
                 bands=near.band_keys(sig_matrix, cfg.bands, cfg.rows) if cfg.near_dedup
                 else np.zeros((len(uids), 0), dtype=np.uint64),
                 live=has_shingles(sig_matrix) if cfg.near_dedup else np.zeros(len(uids), dtype=bool))
        np.save(tmp / "sigs.npy", sig_matrix)  # read back memory-mapped, for verification only
        (tmp / "stats.json").write_text(json.dumps({"fingerprint": cfg.fingerprint(), "files": seen,
                                                    "read": asdict(stats), "peak_rss_mb": peak_rss_mb(),
                                                    "reads_all": reads_every_input(cfg.inputs, n),
                                                    "seconds": round(time.perf_counter() - t0, 3)}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return "done"


@dataclass
class MergeResult:
    report: dict[str, Any]
    outputs: list[Path]


def _signature_rows(cfg: CleanConfig, n: int, sizes: list[int], rows: np.ndarray):
    """Signatures of rows (indices into `rows`) read from the shards' memory-mapped sigs.npy:
    the merge holds band keys for every file but signatures only for candidate pairs."""
    maps = [np.load(shard_dir(cfg, i, n) / "sigs.npy", mmap_mode="r") for i in range(n)]
    offsets = np.concatenate([[0], np.cumsum(sizes)])

    def get(idx: np.ndarray) -> np.ndarray:
        g = rows[idx]
        shard = np.searchsorted(offsets, g, side="right") - 1
        out = np.empty((len(idx), cfg.num_perm), dtype=np.uint32)
        for s in np.unique(shard).tolist():
            sel = shard == s
            out[sel] = maps[s][g[sel] - offsets[s]]
        return out

    return get


def _manifest_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def merge(cfg: CleanConfig, n: int, keep_work: bool = False) -> MergeResult:
    """Dedup across all n shards and write the output; every shard must be done."""
    t0 = time.perf_counter()
    missing = [i for i in range(n) if not _shard_done(cfg, i, n)]
    if missing:
        raise DataError(f"{work_dir(cfg)}: shards {', '.join(map(str, missing))} of {n} are not done "
                        "(or were made with other settings); run them first")
    metas = [np.load(shard_dir(cfg, i, n) / "meta.npz") for i in range(n)]
    uid = np.concatenate([m["uid"] for m in metas])
    hashes = np.concatenate([m["hash"] for m in metas])
    keys = np.concatenate([m["keys"] for m in metas])
    order = np.argsort(uid, kind="stable")
    uid, hashes, keys = uid[order], hashes[order], keys[order]

    removed: dict[int, tuple[str, int]] = {}  # uid -> (stage, uid of the kept copy)
    alive = np.ones(uid.size, dtype=bool)
    if cfg.exact_dedup or cfg.near_dedup:
        keeper = exact_dedup.duplicates(uid, hashes, keys)
        for u, k in zip(uid[keeper >= 0].tolist(), keeper[keeper >= 0].tolist()):
            removed[u] = ("exact_dedup", k)
        alive = keeper < 0
    clusters = 0
    if cfg.near_dedup:
        rows = order[alive]  # positions in the shards' concatenation, in uid order
        bkeys = np.concatenate([m["bands"] for m in metas])[rows]
        live = np.concatenate([m["live"] for m in metas])[rows]
        sig_rows = _signature_rows(cfg, n, [m["uid"].size for m in metas], rows)
        keeper = near.duplicates_from_bands(uid[alive], bkeys, live, sig_rows, keys[alive], cfg.near_verify)
        for u, k in zip(uid[alive][keeper >= 0].tolist(), keeper[keeper >= 0].tolist()):
            removed[u] = ("near_dedup", k)
        clusters = len(set(keeper[keeper >= 0].tolist()))

    out_dir = Path(cfg.output)
    where: dict[int, tuple[str, Optional[str], Optional[str]]] = {}
    entries: list[dict[str, Any]] = []
    outputs: list[Path] = []
    kept_files = 0
    for i in range(n):
        d = shard_dir(cfg, i, n)
        shard_uids = metas[i]["uid"].tolist()
        with open(d / "index.jsonl", encoding="utf-8") as f:
            for u, line in zip(shard_uids, f):
                w = json.loads(line)
                where[u] = (w[0], w[1], w[2])
        entries += _manifest_lines(d / "manifest.jsonl")
        dest = out_dir / f"part-{i:05d}-of-{n:05d}.jsonl"
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        with open(d / "kept.jsonl", encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
            for u, line in zip(shard_uids, src):
                if u not in removed:
                    dst.write(line)
                    kept_files += 1
        os.replace(tmp, dest)
        outputs.append(dest)
    for u, (stage, k) in removed.items():
        w, kw = where[u], where[k]
        entries.append({"uid": u, "where": w[0], "repo_name": w[1], "path": w[2], "action": "removed",
                        "stage": stage, "reason": "exact_duplicate" if stage == "exact_dedup" else "near_duplicate",
                        "detail": {"kept": kw[0], "kept_repo_name": kw[1], "kept_path": kw[2]}})
    # a redaction of a file later removed as a duplicate is not a change to the output
    entries = [e for e in entries if not (e["action"] == "redacted" and e["uid"] in removed)]
    entries.sort(key=lambda e: (e["uid"], e["action"] != "removed"))

    report = build_report(cfg, n, entries, kept_files, clusters, time.perf_counter() - t0)
    _write_atomic(out_dir / "manifest.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    _write_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    for old in out_dir.glob("part-*-of-*.jsonl"):
        if old not in outputs:
            old.unlink()
    if not keep_work:
        shutil.rmtree(work_dir(cfg), ignore_errors=True)
    return MergeResult(report, outputs)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _scan_job(args: tuple[CleanConfig, int, int]) -> str:
    cfg, i, n = args
    return scan_shard(cfg, i, n)


def run_local(cfg: CleanConfig, workers: int, keep_work: bool = False) -> MergeResult:
    """All shards on this machine (one per worker process, started by a fork server: a fresh
    interpreter, not a fork of a caller that may hold torch's threads), then the merge."""
    cfg.check()
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    if workers == 1:
        scan_shard(cfg, 0, 1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("forkserver")) as pool:
            list(pool.map(_scan_job, [(cfg, i, workers) for i in range(workers)]))
    return merge(cfg, workers, keep_work)
