"""Code corpora as repositories: a directory of repositories, or the running interpreter's
standard library (the demo's corpus; each top-level package or module one repository).

A repository is `(name, [(relative path, text), ...])`, files sorted by path so the result
never depends on directory listing order.

A directory is untrusted input: nothing outside it is read (a symlink leaving it is skipped,
directory symlinks are never followed, so loops cannot happen), only regular files are opened
(a FIFO, socket or device is skipped: opening a FIFO would block forever), a file larger than
the cap is skipped before it is read, and names that could blur the repository format (control
characters, special-token text) are refused. Each skipped thing is counted and named.
"""

from __future__ import annotations

import os
import stat
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from megatron_sc2.errors import DataError
from megatron_sc2.data.special_tokens import STARCODER2_SPECIAL_TOKENS

Repository = tuple[str, list[tuple[str, str]]]

_SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "site-packages"}
DEFAULT_MAX_READ_BYTES = 64 << 20  # no source file is this large; a larger one is skipped unread
MAX_NAMED_SKIPS = 1000
SHARD_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet")


@dataclass
class ReadCounts:
    """What reading a repository directory skipped, for the preprocessing summary."""

    binary_files: int = 0
    non_utf8_files: int = 0
    loose_files: int = 0
    symlinks_outside: int = 0      # a link whose target lies outside the input directory
    broken_symlinks: int = 0       # dangling, or a loop
    linked_directories: int = 0    # a directory symlink inside the input (never followed)
    special_files: int = 0         # FIFOs, sockets, devices
    oversized_files: int = 0       # above the read cap: skipped before reading
    filtered_max_file_size: int = 0  # above --max-file-size: also skipped before reading
    unsafe_names: int = 0          # control characters or special-token text in a name
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (reason, path) in order

    def skip(self, reason: str, path: Path | str, detail: str = "") -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        if len(self.skipped) < MAX_NAMED_SKIPS:  # the counters stay exact; memory stays flat
            self.skipped.append((reason, f"{path}{detail}"))

    @property
    def skipped_paths(self) -> list[str]:
        return [p for _, p in self.skipped]


def unsafe_name(name: str) -> Optional[str]:
    """Why a repository or path name cannot go into a repository document, or None."""
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "a control character (newline, tab, ...)"
    for tok in STARCODER2_SPECIAL_TOKENS:
        if tok in name:
            return f"special-token text {tok}"
    return None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass
class _Reader:
    root: str                # the input directory, resolved: nothing outside it is read
    counts: ReadCounts
    skip_non_utf8: bool
    max_bytes: int
    over_reason: str = "oversized_files"

    def read(self, path: Path) -> Optional[str]:
        """Text of a regular file inside the root, or None (counted) when it is skipped."""
        try:
            st = os.lstat(path)
        except OSError as e:
            self.counts.skip("broken_symlinks", path, f" ({e.strerror})")
            return None
        if stat.S_ISLNK(st.st_mode):
            target = os.path.realpath(path)
            if not _inside(target, self.root):
                self.counts.skip("symlinks_outside", path, f" -> {target}")
                return None
            try:
                st = os.stat(target)
            except OSError:
                self.counts.skip("broken_symlinks", path)  # dangling or a loop
                return None
            if stat.S_ISDIR(st.st_mode):
                self.counts.skip("linked_directories", path)
                return None
        if not stat.S_ISREG(st.st_mode):
            self.counts.skip("special_files", path)
            return None
        if st.st_size > self.max_bytes:
            if self.over_reason == "oversized_files":
                self.counts.skip("oversized_files", path, f" ({st.st_size:,} bytes)")
            else:
                self.counts.filtered_max_file_size += 1  # a filter, counted like the filter
            return None
        # O_NONBLOCK: were the file swapped for a FIFO after the check, opening must not block.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e.strerror})") from None
        with os.fdopen(fd, "rb") as f:
            fst = os.fstat(f.fileno())
            if not stat.S_ISREG(fst.st_mode):
                self.counts.skip("special_files", path)
                return None
            data = f.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            self.counts.skip("oversized_files", path, " (grew while read)")
            return None
        if b"\x00" in data[:8192]:
            self.counts.skip("binary_files", path)
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.skip_non_utf8:
                self.counts.skip("non_utf8_files", path)
                return None
            raise DataError(f"{path}: not valid UTF-8 (byte {e.start}); "
                            "pass --skip-malformed to skip such files") from None

    def files(self, top: Path, suffixes: Optional[tuple[str, ...]], rel_to: Path) -> list[tuple[str, str]]:
        """(relative path, text) of every readable file under `top`, sorted by path."""
        paths: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            keep = []
            for d in sorted(dirnames):
                if d in _SKIP_DIRS:
                    continue
                full = Path(dirpath) / d
                if full.is_symlink():
                    target = os.path.realpath(full)
                    self.counts.skip("linked_directories" if _inside(target, self.root) else "symlinks_outside",
                                     full, "" if _inside(target, self.root) else f" -> {target}")
                    continue
                keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                if suffixes is None or name.endswith(suffixes):
                    paths.append(Path(dirpath) / name)
        out = []
        for path in sorted(paths, key=lambda p: p.relative_to(rel_to).as_posix()):
            rel = path.relative_to(rel_to).as_posix()
            why = unsafe_name(rel)
            if why:
                self.counts.skip("unsafe_names", repr(str(path)), f" ({why})")
                continue
            text = self.read(path)
            if text is not None:
                out.append((rel, text))
        return out


def iter_repository_dir(root: str | os.PathLike, counts: Optional[ReadCounts] = None,
                        skip_non_utf8: bool = False, suffixes: Optional[tuple[str, ...]] = None,
                        max_file_size: Optional[int] = None) -> Iterator[Repository]:
    """Each subdirectory of `root` is one repository; files at the top level are counted as
    loose and skipped. Binary files (a NUL byte in the first 8 KiB) are skipped and counted.
    Files above `max_file_size` (or the read cap) are skipped without being read."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"input directory not found: {root}")
    counts = counts if counts is not None else ReadCounts()
    cap = DEFAULT_MAX_READ_BYTES  # read at call time (tests lower it)
    if max_file_size is not None and max_file_size < cap:
        reader = _Reader(os.path.realpath(root), counts, skip_non_utf8, max_file_size, "filtered_max_file_size")
    else:
        reader = _Reader(os.path.realpath(root), counts, skip_non_utf8, cap)
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    shards = [e.name for e in entries if e.name.endswith(SHARD_SUFFIXES) and e.is_file()]
    if shards:
        raise DataError(f"--input {root}: a directory of repositories, but it holds data shards "
                        f"({', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''}); to read them, "
                        f"pass --input '{root}/*{Path(shards[0]).suffix}'")
    for entry in entries:
        if entry.name in _SKIP_DIRS:
            continue
        if entry.is_symlink():
            target = os.path.realpath(entry)
            if not _inside(target, reader.root):
                counts.skip("symlinks_outside", entry, f" -> {target}")
            elif not os.path.exists(target):
                counts.skip("broken_symlinks", entry)
            elif os.path.isdir(target):
                counts.skip("linked_directories", entry)
            else:
                counts.skip("loose_files", entry)
            continue
        if entry.is_file():
            counts.skip("loose_files", entry)
            continue
        if not entry.is_dir():
            counts.skip("special_files", entry)
            continue
        why = unsafe_name(entry.name)
        if why:
            counts.skip("unsafe_names", repr(str(entry)), f" ({why})")
            continue
        files = reader.files(entry, suffixes, entry)
        if files:
            yield entry.name, files


def stdlib_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_repositories(include_tests: bool = True) -> Iterator[Repository]:
    """The interpreter's standard library as repositories: each top-level package (its `.py`
    files) or top-level module one repository; no site-packages. ~30 MB on CPython 3.11."""
    root = stdlib_path()
    reader = _Reader(os.path.realpath(root), ReadCounts(), True, DEFAULT_MAX_READ_BYTES)
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name in _SKIP_DIRS or entry.name.startswith("."):
            continue
        if not include_tests and entry.name in ("test", "idlelib", "lib2to3"):
            continue
        if entry.is_file() and entry.suffix == ".py":
            text = reader.read(entry)
            if text is not None:
                yield entry.stem, [(entry.name, text)]
        elif entry.is_dir() and not entry.is_symlink() and not entry.name.startswith("config-"):
            files = reader.files(entry, (".py",), root)
            if files:
                yield entry.name, files
