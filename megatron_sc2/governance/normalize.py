"""Data Portraits' text normalization, and its map back to the caller's characters.

Rules, in order: runs of line breaks (`[\\r\\n]+`) become one `\\n`; runs of other whitespace
become one space; the space left after a newline goes; the ends are stripped. The index keeps
only the normalized text; a query also keeps, for each normalized character, the offset of the
original character it came from, so that matched spans are reported in the text the caller
sent (indentation and CRLF included).
"""

from __future__ import annotations

import re

import numpy as np

_NEWLINES = re.compile(r"[\r\n]+")
_SPACES = re.compile(r"[^\S\n]+")
_AFTER_NEWLINE = re.compile(r"\n ")
_RUNS = re.compile(r"[\r\n]+|[^\S\r\n]+|\S+")


def normalize(text: str) -> str:
    """The normalized text (the fast path the index builder uses)."""
    text = _NEWLINES.sub("\n", text)
    text = _SPACES.sub(" ", text)
    text = _AFTER_NEWLINE.sub("\n", text)
    return text.strip()


def normalize_with_offsets(text: str) -> tuple[str, np.ndarray]:
    """`normalize(text)` and, for each of its characters, the offset in `text` it stands for
    (a collapsed run stands for its first character)."""
    pieces: list[str] = []
    offsets: list[int] = []
    last = ""  # the kind of the last emitted piece: "", "nl", "ws", "txt"
    for m in _RUNS.finditer(text):
        s = m.group()
        c = s[0]
        if c == "\r" or c == "\n":
            pieces.append("\n")
            offsets.append(m.start())
            last = "nl"
        elif c.isspace():
            if last == "nl":
                continue
            pieces.append(" ")
            offsets.append(m.start())
            last = "ws"
        else:
            pieces.append(s)
            offsets.extend(range(m.start(), m.end()))
            last = "txt"
    out = "".join(pieces)
    # strip: whitespace pieces are single characters, so the ends map one to one
    a, b = 0, len(out)
    while a < b and out[a].isspace():
        a += 1
    while b > a and out[b - 1].isspace():
        b -= 1
    return out[a:b], np.asarray(offsets[a:b], dtype=np.int64)
