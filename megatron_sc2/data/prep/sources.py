"""Reading preprocessing inputs as a stream of documents.

Inputs: JSON lines (plain, `.gz`, `.zst`), parquet (The Stack v2's `repo_name`/`path`/
`content` columns: files of one repository become one document), directories of
repositories; several files or globs at once. Everything streams: memory stays flat in the
input size. Bad input is a `DataError` naming the file and line, or, with `skip_malformed`,
is counted in `ReadStats` and skipped.

Each format is one row of `SOURCE_FORMATS` (how to recognise it, how to read documents and
plain texts from it); every file a filter looks at goes through `ReadContext.keep`, the one
place that applies the filters and counts what they drop.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from megatron_sc2.errors import ConfigError, DataError
from megatron_sc2.data.prep.corpus import MAX_NAMED_SKIPS, ReadCounts, iter_repository_dir, unsafe_name
from megatron_sc2.data.prep.repo_format import repository_pieces
from megatron_sc2.data.provenance import FileSpan, Origin

MAX_JSON_LINE_BYTES = 256 << 20  # one JSON line (one document) larger than this is malformed


@dataclass
class Document:
    """One output document: its text per output key, and where it came from (for errors).

    A repository document also carries `pieces`: its separators as `Special` markers between
    ordinary texts, so only those separators become control tokens."""

    where: str
    fields: dict[str, str]
    repo: bool = False  # a repository document: always ends with the end-of-document token
    pieces: Optional[list[str]] = None
    origin: Optional[Origin] = None  # for the provenance sidecar

    def texts(self) -> list[str]:
        return list(self.fields.values())


def repo_document(where: str, name: str, files: list[tuple[str, str]], seed: int, source: str,
                  line: Optional[int] = None, row: Optional[int] = None) -> Document:
    pieces, spans = repository_pieces(name, files, seed)
    origin = Origin(source, line, row, name, [FileSpan(*sp) for sp in spans])
    return Document(where, {"text": "".join(pieces)}, repo=True, pieces=pieces, origin=origin)


@dataclass
class FileFilters:
    """The StarCoder data filters (all off by default) and exact dedup by content hash."""

    max_file_size: Optional[int] = None          # bytes of UTF-8
    max_line_length: Optional[int] = None        # characters
    min_alphanum_fraction: Optional[float] = None
    dedup: bool = False
    _seen: set[bytes] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_file_size", "max_line_length"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {v}")
        f = self.min_alphanum_fraction
        if f is not None and not 0.0 <= f <= 1.0:  # also refuses nan
            raise ConfigError(f"--min-alphanum-fraction must lie in [0, 1], got {f}")

    def active(self) -> bool:
        return bool(self.max_file_size or self.max_line_length
                    or self.min_alphanum_fraction is not None or self.dedup)

    def reject_reason(self, text: str) -> Optional[str]:
        """None to keep the file, else the summary counter that rejected it."""
        if self.max_file_size is not None and len(text.encode("utf-8", "surrogatepass")) > self.max_file_size:
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


NAMED_REASONS = ("binary_files", "non_utf8_files", "loose_files", "symlinks_outside", "broken_symlinks",
                 "linked_directories", "special_files", "oversized_files", "unsafe_names")


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
    symlinks_outside: int = 0
    broken_symlinks: int = 0
    linked_directories: int = 0
    special_files: int = 0
    oversized_files: int = 0
    unsafe_names: int = 0

    def __post_init__(self) -> None:
        # (reason, path) of skipped things, named in the summary: not a field, so that
        # `asdict(stats)` stays a dict of counters (shards add them up)
        self._skipped: list[tuple[str, str]] = []

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self._skipped

    def add_counts(self, counts: ReadCounts) -> None:
        for name in NAMED_REASONS + ("filtered_max_file_size",):
            setattr(self, name, getattr(self, name) + getattr(counts, name))
        self._skipped.extend(counts.skipped[:max(0, MAX_NAMED_SKIPS - len(self._skipped))])

    def named_skips(self) -> int:
        """How many skipped things have a name (the list keeps only the first ones)."""
        return sum(getattr(self, n) for n in NAMED_REASONS)


@dataclass
class ReadContext:
    """Everything a reader needs: the settings of this run, and the counters it fills."""

    json_keys: Sequence[str] = ("text",)
    repo_context: bool = False
    seed: int = 1234
    skip_malformed: bool = False
    filters: FileFilters = field(default_factory=FileFilters)
    stats: ReadStats = field(default_factory=ReadStats)

    def keep(self, text: str) -> bool:
        """The one filter-and-count routine: False (and the reason counted) to drop a file."""
        if not self.filters.active():
            return True
        reason = self.filters.reject_reason(text)
        if reason:
            setattr(self.stats, reason, getattr(self.stats, reason) + 1)
            return False
        return True

    def malformed(self, message: str) -> None:
        """Count a malformed record under --skip-malformed, else stop with `message`."""
        if self.skip_malformed:
            self.stats.malformed_lines += 1
            return
        raise DataError(message)


def repository_documents(repos: Iterator[tuple[str, list[tuple[str, str]]]], seed: int,
                         filters: FileFilters, stats: ReadStats, where: str = "repository ",
                         source: str = "repositories") -> Iterator[Document]:
    """Each repository one document in StarCoder2's format, after the file filters (each
    rejected file counted under its reason); a repository with no file left yields nothing."""
    ctx = ReadContext(seed=seed, filters=filters, stats=stats)
    yield from _repository_documents(repos, ctx, where, source)


def _repository_documents(repos: Iterator[tuple[str, list[tuple[str, str]]]], ctx: ReadContext,
                          where: str, source: str) -> Iterator[Document]:
    for name, files in repos:
        kept = []
        for rel, text in files:
            ctx.stats.input_bytes += len(text)
            if ctx.keep(text):
                kept.append((rel, text))
        if kept:
            yield repo_document(f"{where}{name}", name, kept, ctx.seed, source)


# -- JSON lines ----------------------------------------------------------------------------------

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
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":
            raise DataError(f"{path}: zstd stream is corrupt or ends early after line {lineno} ({e})") from None
        raise


def iter_jsonl_records(path: Path, stats: ReadStats, skip_malformed: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    ctx = ReadContext(skip_malformed=skip_malformed, stats=stats)
    yield from _jsonl_records(path, ctx)


def _jsonl_records(path: Path, ctx: ReadContext) -> Iterator[tuple[int, dict[str, Any]]]:
    hint = "pass --skip-malformed to skip such lines"
    for lineno, raw in iter_lines(path, ctx.stats):
        if not raw.strip():
            continue
        if len(raw) > MAX_JSON_LINE_BYTES:
            ctx.malformed(f"{path}:{lineno}: line of {len(raw):,} bytes, above the limit of "
                          f"{MAX_JSON_LINE_BYTES:,}; {hint}")
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            ctx.malformed(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line); {hint}")
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("a JSON object per line is expected")
        except RecursionError:
            ctx.malformed(f"{path}:{lineno}: malformed JSON line (nested too deeply); {hint}")
            continue
        except ValueError as e:
            ctx.malformed(f"{path}:{lineno}: malformed JSON line ({e}); {hint}")
            continue
        yield lineno, rec


def _field_text(rec: dict[str, Any], key: str, where: str, ctx: ReadContext) -> Optional[str]:
    """The text under `key`: a string, or a list of strings joined; None when malformed (counted)."""
    value = rec.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        bad = next((i for i, v in enumerate(value) if not isinstance(v, str)), None)
        if bad is None:
            return "".join(value)
        ctx.malformed(f"{where}: item {bad} of the list under key {key!r} is a {type(value[bad]).__name__}, "
                      "not a string; pass --skip-malformed to skip such lines")
        return None
    if key not in rec:
        have = ", ".join(sorted(map(str, rec))[:10]) or "none"
        ctx.malformed(f"{where}: no text under key {key!r} (keys: {have}); check --json-keys")
    else:
        ctx.malformed(f"{where}: the value under key {key!r} is a {type(value).__name__}, not text; "
                      "pass --skip-malformed to skip such lines")
    return None


def _checked_names(repo: Any, path: Any, where: str, ctx: ReadContext) -> bool:
    """Repository and file names go into the document: strings without control characters or
    special-token text (they would blur the format)."""
    if not isinstance(repo, str) or not isinstance(path, str):
        ctx.malformed(f"{where}: --repo-context needs string fields 'repo_name' and 'path'")
        return False
    for what, name in (("repo_name", repo), ("path", path)):
        why = unsafe_name(name)
        if why:
            ctx.malformed(f"{where}: {what} {name!r} holds {why}; pass --skip-malformed to skip such rows")
            return False
    return True


@dataclass
class RepoGrouper:
    """Groups consecutive records of the same repository into repository documents.

    One repository is one document, so its rows must be consecutive within an input file; a
    repository that comes back after others is an error (it would silently become two
    documents). Repositories already seen in the file are remembered by an 8-byte hash."""

    ctx: ReadContext
    current: Optional[str] = None
    where: str = ""
    files: list[tuple[str, str]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    src: tuple[str, Optional[int], Optional[int]] = ("", None, None)  # input file, line, row

    def add(self, repo: str, path: str, text: str, where: str,
            src: tuple[str, Optional[int], Optional[int]] = ("", None, None)) -> Optional[Document]:
        out = None
        if repo != self.current:
            key = int.from_bytes(hashlib.blake2b(repo.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                 "little")
            if key in self.seen:
                raise DataError(f"{where}: repository {repo!r} again, after other repositories; one "
                                f"repository's rows must be consecutive (sort the input by repo_name)")
            out = self.flush()
            self.current, self.where, self.src = repo, where, src
            self.seen.add(key)
        if self.ctx.keep(text):
            self.files.append((path, text))
        return out

    def flush(self) -> Optional[Document]:
        doc = None
        if self.current is not None and self.files:
            doc = repo_document(self.where, self.current, self.files, self.ctx.seed, *self.src)
        self.current, self.files = None, []
        return doc


def _read_jsonl(path: Path, ctx: ReadContext) -> Iterator[Document]:
    grouper = RepoGrouper(ctx) if ctx.repo_context else None
    for lineno, rec in _jsonl_records(path, ctx):
        where = f"{path}:{lineno}"
        if grouper is not None:
            key = ctx.json_keys[0]
            if key not in rec and "content" in rec:
                key = "content"
            text = _field_text(rec, key, where, ctx)
            if text is None or not _checked_names(rec.get("repo_name"), rec.get("path"), where, ctx):
                continue
            doc = grouper.add(rec["repo_name"], rec["path"], text, where, (str(path), lineno, None))
            if doc is not None:
                yield doc
            continue
        fields_: dict[str, str] = {}
        for key in ctx.json_keys:
            text = _field_text(rec, key, where, ctx)
            if text is None:
                break
            fields_[key] = text
        else:
            text0 = fields_[ctx.json_keys[0]]
            if ctx.keep(text0):
                yield Document(where, fields_, origin=_record_origin(rec, str(path), lineno, None, text0))
    if grouper is not None:
        doc = grouper.flush()
        if doc is not None:
            yield doc


def _record_origin(rec: dict[str, Any], source: str, line: Optional[int], row: Optional[int],
                   text: str) -> Origin:
    """A one-file document's origin; The Stack's `repo_name`/`path` fields name its repository."""
    repo, fpath = rec.get("repo_name"), rec.get("path")
    files = [FileSpan(fpath, 0, len(text))] if isinstance(fpath, str) else []
    return Origin(source, line, row, repo if isinstance(repo, str) else None, files)


def _jsonl_texts(path: Path, ctx: ReadContext) -> Iterator[str]:
    for doc in _read_jsonl(path, ctx):
        yield from doc.texts()


# -- parquet -------------------------------------------------------------------------------------

def open_parquet(path: Path):
    """A `pyarrow.parquet.ParquetFile`, or a DataError naming the file (or the missing pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def _read_parquet(path: Path, ctx: ReadContext) -> Iterator[Document]:
    pf = open_parquet(path)
    names = set(pf.schema_arrow.names)
    key0 = ctx.json_keys[0]
    text_col = key0 if key0 in names else "content"
    if text_col not in names:
        raise DataError(f"{path}: no column {key0!r} or 'content' (columns: {', '.join(sorted(names))})")
    grouped = "repo_name" in names and "path" in names
    cols = [text_col] + (["repo_name", "path"] if grouped else [])
    ctx.stats.input_bytes += path.stat().st_size
    grouper = RepoGrouper(ctx) if grouped else None
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=cols):
            data = batch.to_pydict()
            for i, text in enumerate(data[text_col]):
                row += 1
                where = f"{path}:row {row}"
                if not isinstance(text, str):
                    ctx.malformed(f"{where}: column {text_col!r} is not a string")
                    continue
                if grouper is not None:
                    repo, fpath = data["repo_name"][i], data["path"][i]
                    if not _checked_names(repo, fpath, where, ctx):
                        continue
                    doc = grouper.add(repo, fpath, text, where, (str(path), None, row))
                    if doc is not None:
                        yield doc
                elif ctx.keep(text):
                    yield Document(where, {key0: text}, origin=Origin(str(path), row=row))
    except DataError:
        raise
    except Exception as e:  # pyarrow's errors: OSError, ArrowInvalid (a ValueError), ...
        raise DataError(f"{path}: corrupt parquet file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if grouper is not None:
        doc = grouper.flush()
        if doc is not None:
            yield doc


def _parquet_texts(path: Path, ctx: ReadContext) -> Iterator[str]:
    for doc in _read_parquet(path, ctx):
        yield from doc.texts()


# -- directories of repositories -----------------------------------------------------------------

def _repo_dir_reader(path: Path, ctx: ReadContext, counts: ReadCounts):
    # Files the size filter would drop are never read (UTF-8 text has as many bytes as its file).
    return iter_repository_dir(path, counts, skip_non_utf8=ctx.skip_malformed,
                               max_file_size=ctx.filters.max_file_size)


def _read_repodir(path: Path, ctx: ReadContext) -> Iterator[Document]:
    counts = ReadCounts()
    try:
        yield from _repository_documents(_repo_dir_reader(path, ctx, counts), ctx, f"{path}/", str(path))
    finally:
        ctx.stats.add_counts(counts)


def _repodir_texts(path: Path, ctx: ReadContext) -> Iterator[str]:
    """The files themselves (tokenizer training), not repository documents."""
    counts = ReadCounts()
    for _, files in _repo_dir_reader(path, ctx, counts):
        for _, text in files:
            yield text
    ctx.stats.add_counts(counts)


# -- the table -----------------------------------------------------------------------------------

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".gz", ".zst")


@dataclass(frozen=True)
class SourceFormat:
    """One input format: how it is recognised and read."""

    name: str
    matches: Callable[[Path], bool]
    documents: Callable[[Path, ReadContext], Iterator[Document]]
    texts: Callable[[Path, ReadContext], Iterator[str]]  # plain texts, for tokenizer training
    repositories: bool       # its documents are repository documents (need <repo_name>, <file_sep>)
    sized_by_file: bool      # its progress is measured in bytes of the file as read


SOURCE_FORMATS: dict[str, SourceFormat] = {f.name: f for f in (
    SourceFormat("repodir", lambda p: p.is_dir(), _read_repodir, _repodir_texts, True, False),
    SourceFormat("parquet", lambda p: p.is_file() and p.name.endswith(".parquet"), _read_parquet, _parquet_texts,
                 False, False),
    SourceFormat("jsonl", lambda p: p.is_file(), _read_jsonl, _jsonl_texts, False, True),
)}


def expand_inputs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """(format name, path) for each input: a key of SOURCE_FORMATS ("jsonl", "parquet", "repodir")."""
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
            fmt = next((f for f in SOURCE_FORMATS.values() if f.matches(p)), None)
            if fmt is None:
                if p.exists() or p.is_symlink():
                    raise DataError(f"--input {p}: neither a regular file nor a directory "
                                    "(a FIFO, device, socket or dangling link)")
                raise DataError(f"input not found: {p}")
            out.append((fmt.name, p))
    return out


def check_json_keys(json_keys: Sequence[str]) -> None:
    dup = sorted({k for k in json_keys if list(json_keys).count(k) > 1})
    if dup:
        raise ConfigError(f"--json-keys names {', '.join(dup)} more than once (each key is one output)")
    if not json_keys:
        raise ConfigError("--json-keys needs at least one key")


def iter_documents(inputs: Sequence[str], json_keys: Sequence[str] = ("text",), repo_context: bool = False,
                   seed: int = 1234, skip_malformed: bool = False, filters: Optional[FileFilters] = None,
                   stats: Optional[ReadStats] = None) -> Iterator[Document]:
    """Documents of all inputs in order (files in the order given, globs sorted)."""
    check_json_keys(json_keys)
    ctx = ReadContext(json_keys, repo_context, seed, skip_malformed, filters or FileFilters(),
                      stats if stats is not None else ReadStats())
    for kind, path in expand_inputs(inputs):
        ctx.stats.input_files += 1
        yield from SOURCE_FORMATS[kind].documents(path, ctx)


def iter_texts(inputs: Sequence[str], json_key: str = "text", stats: Optional[ReadStats] = None) -> Iterator[str]:
    """Plain texts of all inputs: each JSON line's text, each file of a repository directory."""
    ctx = ReadContext(json_keys=(json_key,), stats=stats if stats is not None else ReadStats())
    for kind, path in expand_inputs(inputs):
        ctx.stats.input_files += 1
        yield from SOURCE_FORMATS[kind].texts(path, ctx)
