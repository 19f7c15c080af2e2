"""Reading preprocessing inputs as a stream of documents.

Inputs: JSON lines (plain, `.gz`, `.zst`), parquet (The Stack v2's `repo_name`/`path`/
`content` columns: files of one repository become one document), directories of
repositories; several files or globs at once. Everything streams: memory stays flat in the
input size. Bad input is a `DataError` naming the file and line, or, with `skip_malformed`,
is counted in `ReadStats` and skipped.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from megatron_sc2.errors import DataError
from megatron_sc2.data.prep.corpus import ReadCounts, iter_repository_dir
from megatron_sc2.data.prep.repo_format import format_repository_spans
from megatron_sc2.data.provenance import FileSpan, Origin


@dataclass
class Document:
    """One output document: its text per output key, and where it came from (for errors)."""

    where: str
    fields: dict[str, str]
    repo: bool = False  # a repository document: always ends with the end-of-document token
    origin: Optional[Origin] = None  # for the provenance sidecar

    def texts(self) -> list[str]:
        return list(self.fields.values())


@dataclass
class FileFilters:
    """The StarCoder data filters (all off by default) and exact dedup by content hash."""

    max_file_size: Optional[int] = None          # bytes of UTF-8
    max_line_length: Optional[int] = None        # characters
    min_alphanum_fraction: Optional[float] = None
    dedup: bool = False
    _seen: set[bytes] = field(default_factory=set, repr=False)

    def active(self) -> bool:
        return bool(self.max_file_size or self.max_line_length
                    or self.min_alphanum_fraction is not None or self.dedup)

    def reject_reason(self, text: str) -> Optional[str]:
        """None to keep the file, else the summary counter that rejected it."""
        if self.max_file_size is not None and len(text.encode("utf-8")) > self.max_file_size:
            return "filtered_max_file_size"
        if self.max_line_length is not None and text and max(map(len, text.split("\n"))) > self.max_line_length:
            return "filtered_max_line_length"
        if self.min_alphanum_fraction is not None and text:
            alnum = sum(c.isalnum() for c in text)
            if alnum / len(text) < self.min_alphanum_fraction:
                return "filtered_alphanum_fraction"
        if self.dedup:
            h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if h in self._seen:
                return "duplicates"
            self._seen.add(h)
        return None


@dataclass
class ReadStats:
    input_files: int = 0
    input_bytes: int = 0
    malformed_lines: int = 0
    empty_documents: int = 0
    filtered_max_file_size: int = 0
    filtered_max_line_length: int = 0
    filtered_alphanum_fraction: int = 0
    duplicates: int = 0
    binary_files: int = 0
    non_utf8_files: int = 0
    loose_files: int = 0


JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".gz", ".zst")


def _repo_document(where: str, name: str, files: list[tuple[str, str]], seed: int, source: str,
                   line: Optional[int] = None, row: Optional[int] = None) -> Document:
    text, spans = format_repository_spans(name, files, seed)
    origin = Origin(source, line, row, name, [FileSpan(*sp) for sp in spans])
    return Document(where, {"text": text}, repo=True, origin=origin)


def repository_documents(repos: Iterator[tuple[str, list[tuple[str, str]]]], seed: int,
                         filters: FileFilters, stats: ReadStats, where: str = "repository ",
                         source: str = "repositories") -> Iterator[Document]:
    """Each repository one document in StarCoder2's format, after the file filters (each
    rejected file counted under its reason); a repository with no file left yields nothing."""
    for name, files in repos:
        kept = []
        for rel, text in files:
            stats.input_bytes += len(text)
            reason = filters.reject_reason(text) if filters.active() else None
            if reason:
                setattr(stats, reason, getattr(stats, reason) + 1)
            else:
                kept.append((rel, text))
        if kept:
            yield _repo_document(f"{where}{name}", name, kept, seed, source)


def expand_inputs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """(kind, path) for each input: kind is "jsonl", "parquet" or "repodir"."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        if any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec))
            if not matches:
                raise DataError(f"--input {spec}: the pattern matches no file")
        else:
            matches = [spec]
        for m in matches:
            p = Path(m)
            if p.is_dir():
                out.append(("repodir", p))
            elif p.is_file():
                out.append(("parquet" if p.name.endswith(".parquet") else "jsonl", p))
            else:
                raise DataError(f"input not found: {p}")
    return out


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    """Decompressed bytes of a .zst file (several frames allowed); a stream that stops inside
    a frame raises EOFError (zstandard's own stream reader returns short data silently)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    in_frame = False  # bytes of the current frame were fed and its end not yet seen
    with open(path, "rb") as f:
        while True:
            raw = f.read(1 << 20)
            if not raw:
                break
            while raw:
                in_frame = True
                out = dobj.decompress(raw)
                if out:
                    yield out
                if dobj.eof:
                    raw = dobj.unused_data
                    dobj = dctx.decompressobj()
                    in_frame = False
                else:
                    raw = b""
    if in_frame:
        raise EOFError("the last zstd frame is incomplete")


def _lines_of_chunks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        data = rest + chunk
        lines = data.split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _open_binary(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_lines(path: Path, stats: Optional[ReadStats] = None) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of a plain/gzip/zstd file; a stream that ends early or
    is corrupt is a DataError naming the file and the last good line."""
    lineno = 0
    try:
        if path.name.endswith(".zst"):
            for lineno, line in enumerate(_lines_of_chunks(_zstd_chunks(path)), start=1):
                if stats is not None:
                    stats.input_bytes += len(line)
                yield lineno, line
            return
        with _open_binary(path) as f:
            for lineno, line in enumerate(f, start=1):
                if stats is not None:
                    stats.input_bytes += len(line)
                yield lineno, line
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: compressed stream is corrupt or ends early after line {lineno} ({e})") from None
    except OSError as e:
        if type(e).__name__ == "ZstdError" or "zstd" in str(e).lower():
            raise DataError(f"{path}: zstd stream is corrupt or ends early after line {lineno} ({e})") from None
        raise DataError(f"{path}: cannot read ({e})") from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":
            raise DataError(f"{path}: zstd stream is corrupt or ends early after line {lineno} ({e})") from None
        raise


def iter_jsonl_records(path: Path, stats: ReadStats, skip_malformed: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, raw in iter_lines(path, stats):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if skip_malformed:
                stats.malformed_lines += 1
                continue
            raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line); "
                            "pass --skip-malformed to skip such lines") from None
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("a JSON object per line is expected")
        except ValueError as e:
            if skip_malformed:
                stats.malformed_lines += 1
                continue
            raise DataError(f"{path}:{lineno}: malformed JSON line ({e}); "
                            "pass --skip-malformed to skip such lines") from None
        yield lineno, rec


def _record_text(rec: dict[str, Any], key: str, where: str, stats: ReadStats, skip_malformed: bool) -> Optional[str]:
    if key not in rec or not isinstance(rec[key], (str, list)):
        if skip_malformed:
            stats.malformed_lines += 1
            return None
        have = ", ".join(sorted(rec)) or "none"
        raise DataError(f"{where}: no text under key {key!r} (keys: {have}); check --json-keys")
    return rec[key]


@dataclass
class RepoGrouper:
    """Groups consecutive records of the same repository into repository documents.

    One repository is one document, so its rows must be consecutive within an input file; a
    repository that comes back after others is an error (it would silently become two
    documents). Repositories already seen in the file are remembered by an 8-byte hash."""

    seed: int
    filters: FileFilters
    stats: ReadStats
    current: Optional[str] = None
    where: str = ""
    files: list[tuple[str, str]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    src: tuple[str, Optional[int], Optional[int]] = ("", None, None)  # input file, line, row

    def add(self, repo: str, path: str, text: str, where: str,
            src: tuple[str, Optional[int], Optional[int]] = ("", None, None)) -> Optional[Document]:
        out = None
        if repo != self.current:
            key = int.from_bytes(hashlib.blake2b(repo.encode(), digest_size=8).digest(), "little")
            if key in self.seen:
                raise DataError(f"{where}: repository {repo!r} again, after other repositories; one "
                                f"repository's rows must be consecutive (sort the input by repo_name)")
            out = self.flush()
            self.current, self.where, self.src = repo, where, src
            self.seen.add(key)
        reason = self.filters.reject_reason(text) if self.filters.active() else None
        if reason:
            setattr(self.stats, reason, getattr(self.stats, reason) + 1)
        else:
            self.files.append((path, text))
        return out

    def flush(self) -> Optional[Document]:
        doc = None
        if self.current is not None and self.files:
            doc = _repo_document(self.where, self.current, self.files, self.seed, *self.src)
        self.current, self.files = None, []
        return doc


def iter_documents(inputs: Sequence[str], json_keys: Sequence[str] = ("text",), repo_context: bool = False,
                   seed: int = 1234, skip_malformed: bool = False, filters: Optional[FileFilters] = None,
                   stats: Optional[ReadStats] = None) -> Iterator[Document]:
    """Documents of all inputs in order (files in the order given, globs sorted)."""
    filters = filters or FileFilters()
    stats = stats if stats is not None else ReadStats()
    for kind, path in expand_inputs(inputs):
        stats.input_files += 1
        if kind == "repodir":
            counts = ReadCounts()
            yield from repository_documents(iter_repository_dir(path, counts, skip_non_utf8=skip_malformed),
                                            seed, filters, stats, where=f"{path}/", source=str(path))
            stats.binary_files += counts.binary_files
            stats.non_utf8_files += counts.non_utf8_files
            stats.loose_files += counts.loose_files
        elif kind == "parquet":
            yield from _iter_parquet(path, json_keys, seed, filters, stats, skip_malformed)
        else:
            yield from _iter_jsonl(path, json_keys, repo_context, seed, filters, stats, skip_malformed)


def _record_origin(rec: dict[str, Any], source: str, line: Optional[int], row: Optional[int],
                   text: str) -> Origin:
    """A one-file document's origin; The Stack's `repo_name`/`path` fields name its repository."""
    repo, fpath = rec.get("repo_name"), rec.get("path")
    files = [FileSpan(fpath, 0, len(text))] if isinstance(fpath, str) else []
    return Origin(source, line, row, repo if isinstance(repo, str) else None, files)


def _iter_jsonl(path: Path, json_keys: Sequence[str], repo_context: bool, seed: int, filters: FileFilters,
                stats: ReadStats, skip_malformed: bool) -> Iterator[Document]:
    grouper = RepoGrouper(seed, filters, stats) if repo_context else None
    for lineno, rec in iter_jsonl_records(path, stats, skip_malformed):
        where = f"{path}:{lineno}"
        if grouper is not None:
            key = json_keys[0]
            if key not in rec and "content" in rec:
                key = "content"
            text = _record_text(rec, key, where, stats, skip_malformed)
            repo, fpath = rec.get("repo_name"), rec.get("path")
            if text is None:
                continue
            if not isinstance(repo, str) or not isinstance(fpath, str):
                if skip_malformed:
                    stats.malformed_lines += 1
                    continue
                raise DataError(f"{where}: --repo-context needs string fields 'repo_name' and 'path'")
            doc = grouper.add(repo, fpath, text if isinstance(text, str) else "".join(text), where,
                              (str(path), lineno, None))
            if doc is not None:
                yield doc
            continue
        fields_: dict[str, str] = {}
        ok = True
        for key in json_keys:
            text = _record_text(rec, key, where, stats, skip_malformed)
            if text is None:
                ok = False
                break
            fields_[key] = text if isinstance(text, str) else "".join(text)
        if not ok:
            continue
        if filters.active():
            reason = filters.reject_reason(fields_[json_keys[0]])
            if reason:
                setattr(stats, reason, getattr(stats, reason) + 1)
                continue
        yield Document(where, fields_, origin=_record_origin(rec, str(path), lineno, None, fields_[json_keys[0]]))
    if grouper is not None:
        doc = grouper.flush()
        if doc is not None:
            yield doc


def _iter_parquet(path: Path, json_keys: Sequence[str], seed: int, filters: FileFilters, stats: ReadStats,
                  skip_malformed: bool) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = set(pf.schema_arrow.names)
    text_col = json_keys[0] if json_keys[0] in names else "content"
    if text_col not in names:
        raise DataError(f"{path}: no column {json_keys[0]!r} or 'content' (columns: {', '.join(sorted(names))})")
    grouped = "repo_name" in names and "path" in names
    cols = [text_col] + (["repo_name", "path"] if grouped else [])
    stats.input_bytes += path.stat().st_size
    grouper = RepoGrouper(seed, filters, stats) if grouped else None
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=cols):
            data = batch.to_pydict()
            for i, text in enumerate(data[text_col]):
                row += 1
                where = f"{path}:row {row}"
                if not isinstance(text, str):
                    if skip_malformed:
                        stats.malformed_lines += 1
                        continue
                    raise DataError(f"{where}: column {text_col!r} is not a string")
                if grouper is not None:
                    doc = grouper.add(str(data["repo_name"][i]), str(data["path"][i]), text, where,
                                      (str(path), None, row))
                    if doc is not None:
                        yield doc
                else:
                    reason = filters.reject_reason(text) if filters.active() else None
                    if reason:
                        setattr(stats, reason, getattr(stats, reason) + 1)
                        continue
                    yield Document(where, {json_keys[0]: text}, origin=Origin(str(path), row=row))
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: corrupt parquet file ({e})") from None
    if grouper is not None:
        doc = grouper.flush()
        if doc is not None:
            yield doc
