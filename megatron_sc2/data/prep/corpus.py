"""Code corpora as repositories: a directory of repositories, or the running interpreter's
standard library (the demo's corpus; each top-level package or module one repository).

A repository is `(name, [(relative path, text), ...])`, files sorted by path so the result
never depends on directory listing order.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from megatron_sc2.errors import DataError

Repository = tuple[str, list[tuple[str, str]]]

_SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "site-packages"}


@dataclass
class ReadCounts:
    """What reading a repository directory skipped, for the preprocessing summary."""

    binary_files: int = 0
    non_utf8_files: int = 0
    loose_files: int = 0
    skipped_paths: list[str] = field(default_factory=list)


def _read_text(path: Path, counts: ReadCounts, skip_non_utf8: bool) -> Optional[str]:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        counts.binary_files += 1
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if skip_non_utf8:
            counts.non_utf8_files += 1
            counts.skipped_paths.append(str(path))
            return None
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}); "
                        "pass --skip-malformed to skip such files") from None


def _walk_files(root: Path, suffixes: Optional[tuple[str, ...]]) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if suffixes is None or name.endswith(suffixes):
                out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def iter_repository_dir(root: str | os.PathLike, counts: Optional[ReadCounts] = None,
                        skip_non_utf8: bool = False,
                        suffixes: Optional[tuple[str, ...]] = None) -> Iterator[Repository]:
    """Each subdirectory of `root` is one repository; files at the top level are counted as
    loose and skipped. Binary files (a NUL byte in the first 8 KiB) are skipped and counted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"input directory not found: {root}")
    counts = counts if counts is not None else ReadCounts()
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.is_file():
            counts.loose_files += 1
            continue
        if not entry.is_dir() or entry.name in _SKIP_DIRS:
            continue
        files = []
        for path in _walk_files(entry, suffixes):
            text = _read_text(path, counts, skip_non_utf8)
            if text is not None:
                files.append((path.relative_to(entry).as_posix(), text))
        if files:
            yield entry.name, files


def stdlib_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_repositories(include_tests: bool = True) -> Iterator[Repository]:
    """The interpreter's standard library as repositories: each top-level package (its `.py`
    files) or top-level module one repository; no site-packages. ~30 MB on CPython 3.11."""
    root = stdlib_path()
    counts = ReadCounts()
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name in _SKIP_DIRS or entry.name.startswith("."):
            continue
        if not include_tests and entry.name in ("test", "idlelib", "lib2to3"):
            continue
        if entry.is_file() and entry.suffix == ".py":
            text = _read_text(entry, counts, skip_non_utf8=True)
            if text is not None:
                yield entry.stem, [(entry.name, text)]
        elif entry.is_dir() and not entry.name.startswith("config-"):
            files = []
            for path in _walk_files(entry, (".py",)):
                text = _read_text(path, counts, skip_non_utf8=True)
                if text is not None:
                    files.append((path.relative_to(root).as_posix(), text))
            if files:
                yield entry.name, files
