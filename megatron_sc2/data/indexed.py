"""Megatron's `.bin/.idx` token format (megatron-core `indexed_dataset.py`, version 1).

`.bin` holds the raw tokens back to back. `.idx` (little-endian): magic `MMIDIDX\\0\\0`,
uint64 version 1, uint8 dtype code, uint64 sequence count S, uint64 document-index count D,
int32[S] sequence lengths, int64[S] byte offsets, int64[D] document starts (0 first, S last).

The writer streams tokens to temporary files and renames both only when complete, the old
`.idx` removed first: a crash at any moment leaves the old pair, or a `.bin` without its `.idx`
(no dataset at that prefix), never a new `.bin` beside an old `.idx`. The reader validates
every header field and size, so a truncated or mismatched pair is a `DataError` naming the
file instead of garbage samples.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Protocol, Sequence

import numpy as np

from megatron_sc2.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
    7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE: dict[type, int] = {v: k for k, v in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: Optional[int]) -> type:
    """Megatron's choice: uint16 when the vocabulary is under 65,500, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def data_file_path(prefix: str | os.PathLike) -> Path:
    return Path(str(prefix) + ".bin")


def index_file_path(prefix: str | os.PathLike) -> Path:
    return Path(str(prefix) + ".idx")


def strip_suffix(path: str) -> str:
    """Accept `PREFIX`, `PREFIX.bin` or `PREFIX.idx` where a prefix is wanted."""
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


class Companion(Protocol):
    """A file written beside a `.bin/.idx` pair and replaced together with it."""

    def stage(self) -> tuple[Optional[Path], Path]:
        """Complete the temporary file; (temporary path or None for "no such file", final path)."""

    def abort(self) -> None:
        """Remove the temporary file."""


class IndexedWriter:
    """Append documents, then `finalize()`; until then only `*.tmp-<pid>` files exist.

    Used as a context manager, an exception removes the temporary files."""

    def __init__(self, prefix: str | os.PathLike, dtype: type = np.int32,
                 companions: Sequence["Companion"] = ()):
        self.prefix = str(prefix)
        # Files that describe this pair (the provenance sidecar): replaced in the pair's own
        # window, so none is ever seen beside another pair under the final names.
        self.companions: list[Companion] = list(companions)
        self.dtype = np.dtype(dtype).type
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"unsupported token dtype {dtype}")
        self._itemsize = np.dtype(self.dtype).itemsize
        self._final_bin = data_file_path(self.prefix)
        self._final_idx = index_file_path(self.prefix)
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = Path(str(self._final_bin) + suffix)
        self._tmp_idx = Path(str(self._final_idx) + suffix)
        for final in (self._final_bin, self._final_idx):
            if final.is_dir():
                raise DataError(f"{final}: the output is a directory (pick another --output-prefix)")
        self._final_bin.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._tmp_bin, "wb")
        self._lengths = array("i")
        self._doc_starts = array("q", [0])
        self.num_tokens = 0
        self._done = False

    def add_document(self, ids: Sequence[int] | np.ndarray, sequence_lengths: Optional[Sequence[int]] = None) -> None:
        """One document; `sequence_lengths` splits it into several sequences (sentences)."""
        arr = np.asarray(ids, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        if sequence_lengths is None:
            sequence_lengths = [arr.size]
        self._lengths.extend(int(n) for n in sequence_lengths)
        self._doc_starts.append(len(self._lengths))
        self.num_tokens += int(arr.size)

    def add_document_parts(self, ids: np.ndarray, last: int) -> None:
        """One document: `ids` then the single token `last` (the end-of-document id)."""
        arr = np.asarray(ids)
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._bin.write(np.asarray([last], dtype=self.dtype).tobytes())
        n = int(arr.size) + 1
        self._lengths.append(n)
        self._doc_starts.append(len(self._lengths))
        self.num_tokens += n

    def add_index(self, other: "IndexedDataset") -> None:
        """Append a whole dataset (used by merge): its tokens and its document structure."""
        if np.dtype(other.dtype) != np.dtype(self.dtype):
            raise DataError(f"{other.prefix}: token dtype {np.dtype(other.dtype).name} differs from "
                            f"{np.dtype(self.dtype).name} of the datasets merged before it")
        base = len(self._lengths)
        self._lengths.extend(other.sequence_lengths.tolist())
        self._doc_starts.extend((other.document_indices[1:] + base).tolist())
        with open(other.bin_path, "rb") as f:
            while True:
                chunk = f.read(1 << 24)
                if not chunk:
                    break
                self._bin.write(chunk)
        self.num_tokens += int(other.sequence_lengths.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self._doc_starts) - 1

    def finalize(self) -> None:
        try:
            self._finalize()
        except BaseException:
            self.abort()
            raise

    def _finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if len(self._lengths) else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self._itemsize, out=pointers[1:])
        docs = np.frombuffer(self._doc_starts, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(docs)))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(docs.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        staged = [c.stage() for c in self.companions]
        # The pair is replaced index first: without its .idx an old .bin is no dataset, so no
        # moment shows a new .bin (or a new companion) beside an old .idx under the final names.
        try:
            self._final_idx.unlink()
        except FileNotFoundError:
            pass
        for tmp, final in staged:
            if tmp is None:
                final.unlink(missing_ok=True)  # this pair has none: an old one would lie
            else:
                os.replace(tmp, final)
        os.replace(self._tmp_bin, self._final_bin)
        os.replace(self._tmp_idx, self._final_idx)
        fsync_dir(self._final_idx.parent)
        self._done = True

    def abort(self) -> None:
        for c in self.companions:
            try:
                c.abort()
            except OSError:
                pass
        if not self._bin.closed:
            try:
                self._bin.close()  # flushing may fail again (a full disk): the file goes anyway
            except OSError:
                pass
        for p in (self._tmp_bin, self._tmp_idx):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class IndexHeader:
    dtype: type
    num_sequences: int
    num_doc_indices: int


def _read_header(idx_path: Path) -> IndexHeader:
    size = idx_path.stat().st_size
    if size < HEADER_SIZE:
        raise DataError(f"{idx_path}: truncated index ({size} bytes, the header alone is {HEADER_SIZE})")
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if head[: len(MAGIC)] != MAGIC:
        raise DataError(f"{idx_path}: not a Megatron .idx file (wrong magic {head[:9]!r})")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != VERSION:
        raise DataError(f"{idx_path}: unsupported .idx version {version} (expected {VERSION})")
    code = head[17]
    if code not in DTYPE_CODES:
        raise DataError(f"{idx_path}: unknown token dtype code {code}")
    s, d = struct.unpack("<QQ", head[18:34])
    expected = HEADER_SIZE + s * 4 + s * 8 + d * 8
    if size != expected:
        raise DataError(f"{idx_path}: truncated or corrupt index ({size} bytes; its header with "
                        f"{s} sequences and {d} document entries implies {expected})")
    return IndexHeader(DTYPE_CODES[code], int(s), int(d))


class IndexedDataset:
    """Read-only view of `PREFIX.bin/.idx` (memory-mapped), validated on open."""

    def __init__(self, prefix: str | os.PathLike, validate_offsets: bool = True):
        self.prefix = strip_suffix(str(prefix))
        self.idx_path = index_file_path(self.prefix)
        self.bin_path = data_file_path(self.prefix)
        have_idx, have_bin = self.idx_path.is_file(), self.bin_path.is_file()
        if not have_idx and not have_bin:
            raise DataError(f"dataset not found: neither {self.idx_path} nor {self.bin_path} exists")
        if not have_idx or not have_bin:
            missing = self.idx_path if not have_idx else self.bin_path
            raise DataError(f"{missing}: missing (its pair {self.bin_path if not have_idx else self.idx_path} exists)")
        header = _read_header(self.idx_path)
        self.dtype = header.dtype
        itemsize = np.dtype(self.dtype).itemsize
        s, d = header.num_sequences, header.num_doc_indices
        self._idx_map = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(self._idx_map, dtype="<i4", count=s, offset=off)
        off += 4 * s
        self.sequence_pointers = np.frombuffer(self._idx_map, dtype="<i8", count=s, offset=off)
        off += 8 * s
        self.document_indices = np.frombuffer(self._idx_map, dtype="<i8", count=d, offset=off)
        total = int(self.sequence_lengths.sum(dtype=np.int64))
        bin_size = self.bin_path.stat().st_size
        if bin_size != total * itemsize:
            raise DataError(
                f"{self.bin_path}: size {bin_size} bytes does not match its index {self.idx_path} "
                f"({total} tokens x {itemsize} bytes = {total * itemsize}); truncated or mismatched pair")
        if s and (self.sequence_lengths.min() < 0):
            raise DataError(f"{self.idx_path}: corrupt index (negative sequence length)")
        if d == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != s or (
                d > 1 and np.any(np.diff(self.document_indices) < 0)):
            raise DataError(f"{self.idx_path}: corrupt index (document starts must rise from 0 to {s})")
        if validate_offsets and s:
            expected = np.zeros(s, dtype=np.int64)
            np.cumsum(self.sequence_lengths[:-1].astype(np.int64) * itemsize, out=expected[1:])
            if not np.array_equal(expected, self.sequence_pointers):
                raise DataError(f"{self.idx_path}: corrupt index (byte offsets disagree with lengths)")
        self.num_tokens = total
        self._bin_map = np.memmap(self.bin_path, dtype=self.dtype, mode="r") if total else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens of sequence i from `offset` (`length` of them, default: to its end)."""
        start = int(self.sequence_pointers[i]) // np.dtype(self.dtype).itemsize + offset
        n = int(self.sequence_lengths[i]) - offset if length is None else length
        return np.asarray(self._bin_map[start:start + n])

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def document(self, d: int) -> np.ndarray:
        """All tokens of document d (its sequences back to back)."""
        a, b = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if a == b:
            return np.zeros(0, dtype=self.dtype)
        start = int(self.sequence_pointers[a]) // np.dtype(self.dtype).itemsize
        n = int(self.sequence_lengths[a:b].sum(dtype=np.int64))
        return np.asarray(self._bin_map[start:start + n])

    def token_range(self, chunk: int = 1 << 24) -> tuple[int, int]:
        """Smallest and largest token id in the file ((0, -1) when empty); streamed, memory flat."""
        lo, hi = None, -1
        for a in range(0, self.num_tokens, chunk):
            part = self._bin_map[a:a + chunk]
            pmin, pmax = part.min(), part.max()
            if not np.issubdtype(self.dtype, np.integer) and not (np.isfinite(pmin) and np.isfinite(pmax)):
                raise DataError(f"{self.bin_path}: holds non-finite values, not token ids")
            lo = pmin if lo is None else min(lo, pmin)
            hi = max(hi, pmax)
        return (0, -1) if lo is None else (int(lo), int(hi))

    def max_token(self, chunk: int = 1 << 24) -> int:
        """Largest token id in the file (-1 when empty); streamed, memory flat."""
        return self.token_range(chunk)[1]

    def check_token_ids(self, vocab_size: Optional[int] = None) -> None:
        """Token ids must be integers in [0, vocab_size): a float dataset would be truncated to
        ids and a negative id would index from the end of the embedding."""
        if not np.issubdtype(self.dtype, np.integer):
            raise DataError(f"{self.idx_path}: token dtype {np.dtype(self.dtype).name} cannot hold token ids "
                            "(expected an integer dtype such as uint16 or int32)")
        lo, hi = self.token_range()
        if lo < 0:
            raise DataError(f"{self.bin_path}: negative token id {lo} (a signed dtype holding garbage?)")
        if vocab_size is not None and hi >= vocab_size:
            raise DataError(f"{self.bin_path}: token id {hi} is beyond the vocabulary ({vocab_size} ids); "
                            "was it made with another tokenizer?")

    def check_vocab(self, vocab_size: int) -> None:
        self.check_token_ids(vocab_size)


def write_documents(prefix: str | os.PathLike, docs: Iterable[Sequence[int]], dtype: type = np.int32) -> Path:
    """Convenience: write a whole dataset from token lists."""
    with IndexedWriter(prefix, dtype) as w:
        for ids in docs:
            w.add_document(ids)
        w.finalize()
    return Path(str(prefix))
