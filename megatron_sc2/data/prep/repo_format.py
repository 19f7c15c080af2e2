"""StarCoder2's repository-context document: one repository = one document.

With probability 0.5 the metadata form
`<repo_name>name<file_sep>path\\ncode<file_sep>path\\ncode...`, otherwise
`<file_sep>code<file_sep>code...`; files in random order. Both choices are a pure function of
(seed, repository name), so re-running preprocessing gives the same bytes. The end-of-document
token is appended by the writer (as an id), not here.

The document is built as pieces: `Special` markers (the two separators) between ordinary texts
(names, paths, code), so that a file quoting `<file_sep>` stays text and only our separators
become control tokens. Joined, the pieces are the document's text as the paper shows it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

from megatron_sc2.errors import ConfigError

REPO_NAME = "<repo_name>"
FILE_SEP = "<file_sep>"


@dataclass(frozen=True)
class RepoLayout:
    with_metadata: bool
    order: tuple[int, ...]


def repo_rng(seed: int, repo_name: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x00{repo_name}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def choose_layout(seed: int, repo_name: str, num_files: int, metadata_prob: float = 0.5) -> RepoLayout:
    rng = repo_rng(seed, repo_name)
    with_metadata = rng.random() < metadata_prob
    order = list(range(num_files))
    rng.shuffle(order)
    return RepoLayout(with_metadata, tuple(order))


class Special(str):
    """A control token inside a document's pieces (its text is the token's text)."""

    __slots__ = ()


def format_repository(repo_name: str, files: Sequence[tuple[str, str]], seed: int,
                      metadata_prob: float = 0.5) -> str:
    """The document text (the separators as their token text)."""
    return "".join(repository_pieces(repo_name, files, seed, metadata_prob)[0])


def format_repository_spans(repo_name: str, files: Sequence[tuple[str, str]], seed: int,
                            metadata_prob: float = 0.5) -> tuple[str, list[tuple[str, int, int]]]:
    """The document text and, in document order, each file's (path, start, end) character span
    of its code in that text (for the provenance sidecar)."""
    pieces, spans = repository_pieces(repo_name, files, seed, metadata_prob)
    return "".join(pieces), spans


def repository_pieces(repo_name: str, files: Sequence[tuple[str, str]], seed: int,
                      metadata_prob: float = 0.5) -> tuple[list[str], list[tuple[str, int, int]]]:
    """The document as pieces (`Special` separators and ordinary text, no empty piece) and each
    file's (path, start, end) character span of its code in the joined text."""
    if not files:
        raise ConfigError(f"repository {repo_name!r} has no files")
    # Order first by path so the input order never matters, then shuffle by (seed, name).
    files = sorted(files, key=lambda f: f[0])
    layout = choose_layout(seed, repo_name, len(files), metadata_prob)
    parts: list[str] = []
    spans: list[tuple[str, int, int]] = []
    n = 0
    if layout.with_metadata:
        parts += [Special(REPO_NAME), repo_name]
        n += len(REPO_NAME) + len(repo_name)
    for i in layout.order:
        path, code = files[i]
        head = path + "\n" if layout.with_metadata else ""
        parts += [Special(FILE_SEP), head + code]
        start = n + len(FILE_SEP) + len(head)
        spans.append((path, start, start + len(code)))
        n = start + len(code)
    return [p for p in parts if p], spans
