"""StarCoder2's repository-context document: one repository = one document.

With probability 0.5 the metadata form
`<repo_name>name<file_sep>path\\ncode<file_sep>path\\ncode...`, otherwise
`<file_sep>code<file_sep>code...`; files in random order. Both choices are a pure function of
(seed, repository name), so re-running preprocessing gives the same bytes. The end-of-document
token is appended by the writer (as an id), not here.
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


def format_repository(repo_name: str, files: Sequence[tuple[str, str]], seed: int,
                      metadata_prob: float = 0.5) -> str:
    """The document text (special tokens as text; the tokenizer maps them to their ids)."""
    return format_repository_spans(repo_name, files, seed, metadata_prob)[0]


def format_repository_spans(repo_name: str, files: Sequence[tuple[str, str]], seed: int,
                            metadata_prob: float = 0.5) -> tuple[str, list[tuple[str, int, int]]]:
    """The document text and, in document order, each file's (path, start, end) character span
    of its code in that text (for the provenance sidecar)."""
    if not files:
        raise ConfigError(f"repository {repo_name!r} has no files")
    # Order first by path so the input order never matters, then shuffle by (seed, name).
    files = sorted(files, key=lambda f: f[0])
    layout = choose_layout(seed, repo_name, len(files), metadata_prob)
    parts: list[str] = []
    spans: list[tuple[str, int, int]] = []
    n = 0
    if layout.with_metadata:
        parts.append(REPO_NAME + repo_name)
        n += len(parts[-1])
    for i in layout.order:
        path, code = files[i]
        head = FILE_SEP + (path + "\n" if layout.with_metadata else "")
        parts.append(head + code)
        spans.append((path, n + len(head), n + len(head) + len(code)))
        n += len(parts[-1])
    return "".join(parts), spans
