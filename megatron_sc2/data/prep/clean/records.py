"""The files of a corpus, one record each, as `clean` sees them: what `preprocess` reads (JSON
lines plain/.gz/.zst, parquet with The Stack v2's columns, directories of repositories), read
through data/prep/sources.py and corpus.py so that bad input fails with the same messages.

Each record keeps all its columns (they go to the output as they are, the text replaced where
redacted) and gets a uid, `(input index << 40) | position`, the same in every sharding: shards
are assigned by a hash of `repo_name` (a repository's files stay together and in order, as
`preprocess --repo-context` needs) or, without one, by position.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from megatron_sc2.errors import DataError
from megatron_sc2.data.prep.corpus import ReadCounts, iter_repository_dir
from megatron_sc2.data.prep.sources import ReadStats, expand_inputs, iter_jsonl_records, open_parquet

_POS_BITS = 40


@dataclass
class FileRecord:
    uid: int
    where: str
    text_key: str
    record: dict[str, Any]

    @property
    def text(self) -> str:
        return self.record[self.text_key]

    @property
    def repo(self) -> Optional[str]:
        v = self.record.get("repo_name")
        return v if isinstance(v, str) else None

    @property
    def path(self) -> Optional[str]:
        v = self.record.get("path")
        return v if isinstance(v, str) else None


def shard_of(repo: Optional[str], position: int, nshards: int) -> int:
    if nshards == 1:
        return 0
    if repo is not None:
        return int.from_bytes(hashlib.blake2b(repo.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                              "little") % nshards
    return position % nshards


def _pick_key(rec: dict[str, Any], text_key: Optional[str], where: str) -> str:
    if text_key is not None:
        key = text_key
    else:
        key = "content" if "content" in rec else "text"
    if key not in rec or not isinstance(rec[key], (str, list)):
        have = ", ".join(sorted(rec)) or "none"
        raise DataError(f"{where}: no text under key {key!r} (keys: {have}); check --json-keys")
    return key


def reads_every_input(inputs: Sequence[str], nshards: int) -> bool:
    """Whether each shard reads every input (fewer input files than shards: records are dealt
    out instead), so that counts about the inputs are the same in every shard."""
    return nshards > 1 and len(expand_inputs(inputs)) < nshards


def input_owner(inputs: Sequence[str], nshards: int) -> list[int]:
    """The shard of each input file when there are at least as many files as shards: largest
    first to the least loaded shard (directories count as the mean file size)."""
    specs = expand_inputs(inputs)
    sizes = [p.stat().st_size if kind != "repodir" else -1 for kind, p in specs]
    mean = max(1, sum(s for s in sizes if s >= 0) // max(1, sum(s >= 0 for s in sizes)))
    sizes = [s if s >= 0 else mean for s in sizes]
    load = [0] * nshards
    owner = [0] * len(specs)
    for idx in sorted(range(len(specs)), key=lambda i: (-sizes[i], i)):
        s = min(range(nshards), key=lambda k: (load[k], k))
        owner[idx] = s
        load[s] += sizes[idx]
    return owner


def iter_records(inputs: Sequence[str], stats: ReadStats, text_key: Optional[str] = None,
                 skip_malformed: bool = False, shard: int = 0, nshards: int = 1) -> Iterator[FileRecord]:
    """The records of this shard, in input order. With at least as many input files as shards,
    a shard reads only its own files (`input_owner`); else every shard reads every file and
    keeps its records (`shard_of`)."""
    specs = expand_inputs(inputs)
    owner = input_owner(inputs, nshards) if nshards > 1 and len(specs) >= nshards else None
    for idx, (kind, path) in enumerate(specs):
        if owner is not None:
            if owner[idx] != shard:
                continue
            shard_, nshards_ = 0, 1  # this whole file is ours
        else:
            shard_, nshards_ = shard, nshards
        yield from _file_records(idx, kind, path, stats, text_key, skip_malformed, shard_, nshards_)


def _file_records(idx: int, kind: str, path: Path, stats: ReadStats, text_key: Optional[str],
                  skip_malformed: bool, shard: int, nshards: int) -> Iterator[FileRecord]:
    stats.input_files += 1
    base = idx << _POS_BITS
    if kind == "repodir":
        counts = ReadCounts()
        pos = 0
        for name, files in iter_repository_dir(path, counts, skip_non_utf8=skip_malformed):
            mine = shard_of(name, 0, nshards) == shard
            for rel, text in files:
                stats.input_bytes += len(text)
                if mine:
                    yield FileRecord(base | pos, f"{path}/{name}/{rel}", "content",
                                     {"repo_name": name, "path": rel, "content": text})
                pos += 1
        stats.binary_files += counts.binary_files
        stats.non_utf8_files += counts.non_utf8_files
        stats.loose_files += counts.loose_files
    elif kind == "parquet":
        yield from _parquet(path, base, stats, text_key, skip_malformed, shard, nshards)
    else:
        pos = 0
        for lineno, rec in iter_jsonl_records(path, stats, skip_malformed):
            where = f"{path}:{lineno}"
            try:
                key = _pick_key(rec, text_key, where)
            except DataError:
                if skip_malformed:
                    stats.malformed_lines += 1
                    continue
                raise
            if isinstance(rec[key], list):
                rec[key] = "".join(map(str, rec[key]))
            repo = rec.get("repo_name") if isinstance(rec.get("repo_name"), str) else None
            if shard_of(repo, pos, nshards) == shard:
                yield FileRecord(base | pos, where, key, rec)
            pos += 1


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, bytes):
        return None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)


def _parquet(path: Path, base: int, stats: ReadStats, text_key: Optional[str], skip_malformed: bool,
             shard: int, nshards: int) -> Iterator[FileRecord]:
    pf = open_parquet(path)
    names = set(pf.schema_arrow.names)
    key = text_key if text_key in names else "content"
    if key not in names:
        raise DataError(f"{path}: no column {text_key or 'text'!r} or 'content' (columns: {', '.join(sorted(names))})")
    stats.input_bytes += path.stat().st_size
    pos = 0
    try:
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                where = f"{path}:row {pos + 1}"
                if not isinstance(row.get(key), str):
                    if skip_malformed:
                        stats.malformed_lines += 1
                        pos += 1
                        continue
                    raise DataError(f"{where}: column {key!r} is not a string")
                repo = row.get("repo_name") if isinstance(row.get("repo_name"), str) else None
                if shard_of(repo, pos, nshards) == shard:
                    yield FileRecord(base | pos, where, key, {k: _jsonable(v) for k, v in row.items()})
                pos += 1
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: corrupt parquet file ({e})") from None
