"""The provenance sidecar `PREFIX.prov`: where every document of `PREFIX.bin/.idx` came from.

One record per document, in document order: the input file and its line (JSON lines) or row
(parquet), the repository name, and for repository documents each file's path, the character
span of its code inside the document text and the token span of its chunk (the tokens after
its `<file_sep>` up to the next special token, so the path line of the metadata form is
included). Datasets without a sidecar (made by Megatron's tool) work everywhere; the tools
that need provenance say so naming the file.

Layout (so a reader seeks straight to document d, and a truncated file is detected):
    b"SC2PROV1\\n"
    one compact JSON object per document, each ending in "\\n"
    a JSON footer line {"format": ..., "version": 1, "documents": D}
    int64[D + 1] little-endian byte offsets of the records (the last: the footer's offset)
    uint64 D, b"SC2PROVE"
Written under a temporary name and renamed when complete, like the `.bin/.idx` pair.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from megatron_sc2.errors import DataError

HEAD = b"SC2PROV1\n"
TAIL = b"SC2PROVE"
FORMAT = "megatron_sc2.provenance"
VERSION = 1


def provenance_path(prefix: str | os.PathLike) -> Path:
    return Path(str(prefix) + ".prov")


@dataclass
class FileSpan:
    """One file of a repository document: code chars [char_start, char_end) of the document
    text, tokens [token_start, token_end) of the document (None when they could not be told)."""

    path: str
    char_start: int
    char_end: int
    token_start: Optional[int] = None
    token_end: Optional[int] = None


@dataclass
class Origin:
    """Where one document came from."""

    source: str                     # the input file or directory
    line: Optional[int] = None      # 1-based line of a JSON-lines input (first line of a repository)
    row: Optional[int] = None       # 1-based row of a parquet input
    repository: Optional[str] = None
    files: list[FileSpan] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"source": self.source}
        if self.line is not None:
            rec["line"] = self.line
        if self.row is not None:
            rec["row"] = self.row
        if self.repository is not None:
            rec["repository"] = self.repository
        if self.files:
            rec["files"] = [[f.path, f.char_start, f.char_end, f.token_start, f.token_end] for f in self.files]
        return rec

    @staticmethod
    def from_record(rec: dict[str, Any]) -> "Origin":
        files = [FileSpan(*f) for f in rec.get("files", [])]
        return Origin(rec.get("source", "?"), rec.get("line"), rec.get("row"), rec.get("repository"), files)

    def describe(self) -> list[str]:
        where = _printable(self.source) + (f":{self.line}" if self.line is not None else "") + (
            f":row {self.row}" if self.row is not None else "")
        out = [f"source: {where}"]
        if self.repository is not None:
            out.append(f"repository: {_printable(self.repository)}")
        for f in self.files:
            tokens = f"tokens [{f.token_start}, {f.token_end})" if f.token_start is not None else "tokens ?"
            out.append(f"  file {_printable(f.path)}: chars [{f.char_start}, {f.char_end}), {tokens}")
        return out


def _printable(s: str) -> str:
    """A name as it can be printed (a file name that is not UTF-8 shows U+FFFD)."""
    if not isinstance(s, str):
        return str(s)
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def token_spans(ids: np.ndarray, origin: Origin, file_sep: Optional[int], special_ids: Sequence[int]) -> None:
    """Fill the token spans of `origin.files` from the document's ids: the i-th `<file_sep>`
    opens the i-th file; its chunk ends at the next special token. Left unset when the count of
    separators does not match (e.g. literal special-token text in a file)."""
    if not origin.files or file_sep is None:
        return
    ids = np.asarray(ids)
    seps = np.flatnonzero(ids == file_sep)
    if len(seps) != len(origin.files):
        return
    specials = np.flatnonzero(np.isin(ids, np.asarray(list(special_ids), dtype=ids.dtype)))
    for f, s in zip(origin.files, seps):
        nxt = specials[np.searchsorted(specials, s, side="right"):]
        f.token_start, f.token_end = int(s) + 1, int(nxt[0]) if len(nxt) else int(len(ids))


class ProvenanceWriter:
    """Append one record per document, then `finalize()`; until then only a `.tmp-<pid>` exists."""

    def __init__(self, prefix: str | os.PathLike):
        self.path = provenance_path(prefix)
        self._tmp = Path(str(self.path) + f".tmp-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self._tmp, "wb")
        self._f.write(HEAD)
        self._offsets = [len(HEAD)]
        self._done = False

    def add(self, record: dict[str, Any] | Origin) -> None:
        if isinstance(record, Origin):
            record = record.to_record()
        # ASCII with escapes: a file name that is not UTF-8 (a surrogate escape) still reads back
        data = json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"
        self._f.write(data)
        self._offsets.append(self._offsets[-1] + len(data))

    def add_document(self, origin: Optional[Origin], where: str, ids: np.ndarray, repo: bool,
                     file_sep: Optional[int], special_ids: Sequence[int]) -> None:
        """The record of a document preprocess just wrote (`ids` without the end-of-document
        token): token spans from the `<file_sep>` ids of a repository document, or the whole
        document for a one-file record."""
        if origin is None:
            self.add({"source": where})
            return
        if repo:
            token_spans(ids, origin, file_sep, special_ids)
        elif len(origin.files) == 1:
            origin.files[0].token_start, origin.files[0].token_end = 0, int(len(ids))
        self.add(origin)

    def add_raw(self, data: bytes) -> None:
        """A record already encoded by a reader (merge and remove copy records as they are)."""
        self._f.write(data)
        self._offsets.append(self._offsets[-1] + len(data))

    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    def stage(self) -> tuple[Path, Path]:
        """Complete the temporary file (the `.bin/.idx` writer renames it with its pair)."""
        d = self.num_documents
        self._f.write(json.dumps({"format": FORMAT, "version": VERSION, "documents": d}).encode() + b"\n")
        self._f.write(np.asarray(self._offsets, dtype="<i8").tobytes())
        self._f.write(struct.pack("<Q", d) + TAIL)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._done = True
        return self._tmp, self.path

    def abort(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()  # flushing may fail again (a full disk): the file goes anyway
            except OSError:
                pass
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass


class Provenance:
    """Read-only view of a `.prov` file, validated on open; `[d]` is document d's `Origin`."""

    def __init__(self, path: str | os.PathLike, expected_documents: Optional[int] = None):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{self.path}: provenance file not found") from None
        if size < len(HEAD) + 16:
            raise DataError(f"{self.path}: truncated provenance file ({size} bytes)")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        if bytes(self._map[:len(HEAD)]) != HEAD:
            raise DataError(f"{self.path}: not a provenance file (wrong magic)")
        if bytes(self._map[-8:]) != TAIL:
            raise DataError(f"{self.path}: truncated provenance file (no end marker)")
        (d,) = struct.unpack("<Q", bytes(self._map[-16:-8]))
        table = 8 * (d + 1)
        if size < len(HEAD) + table + 16:
            raise DataError(f"{self.path}: truncated or corrupt provenance file ({d} documents claimed)")
        self.offsets = np.frombuffer(self._map, dtype="<i8", count=d + 1, offset=size - 16 - table)
        if self.offsets[0] != len(HEAD) or np.any(np.diff(self.offsets) <= 0) or self.offsets[-1] > size - 16 - table:
            raise DataError(f"{self.path}: corrupt provenance file (record offsets)")
        self.num_documents = int(d)
        if expected_documents is not None and expected_documents != self.num_documents:
            raise DataError(f"{self.path}: has {self.num_documents} records but its dataset has "
                            f"{expected_documents} documents; stale or mismatched sidecar")

    def raw(self, d: int) -> bytes:
        return bytes(self._map[int(self.offsets[d]):int(self.offsets[d + 1])])

    def record(self, d: int) -> dict[str, Any]:
        if not 0 <= d < self.num_documents:
            raise IndexError(d)
        try:
            return json.loads(self.raw(d))
        except ValueError:
            raise DataError(f"{self.path}: corrupt record for document {d}") from None

    def __getitem__(self, d: int) -> Origin:
        return Origin.from_record(self.record(d))

    def __len__(self) -> int:
        return self.num_documents

    def __iter__(self) -> Iterator[Origin]:
        for d in range(self.num_documents):
            yield self[d]


def open_provenance(prefix: str | os.PathLike, num_documents: Optional[int] = None) -> Optional[Provenance]:
    """The sidecar of dataset `prefix`, or None when it has none."""
    path = provenance_path(prefix)
    if not path.exists():
        return None
    return Provenance(path, num_documents)


def require_provenance(prefix: str | os.PathLike, num_documents: Optional[int] = None, why: str = "") -> Provenance:
    prov = open_provenance(prefix, num_documents)
    if prov is None:
        raise DataError(f"{provenance_path(prefix)}: no provenance sidecar for dataset {prefix}"
                        f"{' (' + why + ')' if why else ''}; re-run preprocess to make one")
    return prov


class NoProvenance:
    """A pair written without a sidecar: a stale one at the output goes with the old pair."""

    def __init__(self, prefix: str | os.PathLike):
        self.path = provenance_path(prefix)
        self._done = True

    def stage(self) -> tuple[None, Path]:
        return None, self.path

    def abort(self) -> None:
        pass


def merge_provenance(prefixes: Sequence[str], doc_counts: Sequence[int], output_prefix: str) -> Optional[ProvenanceWriter]:
    """The sidecar of a merged dataset, written but not yet staged (pass it to the pair's
    writer as a companion): records in input order; documents of an input without
    a sidecar get a record naming that dataset and the document's number in it. None when no
    input has a sidecar."""
    sidecars = [open_provenance(p, n) for p, n in zip(prefixes, doc_counts)]
    if all(s is None for s in sidecars):
        return None
    w = ProvenanceWriter(output_prefix)
    try:
        for p, n, s in zip(prefixes, doc_counts, sidecars):
            for d in range(n):
                if s is not None:
                    w.add_raw(s.raw(d))
                else:
                    w.add({"source": str(p), "document": d})
    except BaseException:
        w.abort()
        raise
    return w
