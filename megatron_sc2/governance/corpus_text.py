"""The text a model was trained on, read back from `.bin/.idx`: each document cut at its special
tokens (`<repo_name>`, `<file_sep>`, `<|endoftext|>`, ...) into segments of plain text, each
decoded on its own. The portrait indexes these segments, so a window never straddles two files
or a special token's text.

For byte-level BPE tokenizers (StarCoder2's) the bytes of every token are gathered with numpy
from one table and decoded once per segment, as the tokenizer's own decoder does (invalid UTF-8
becomes U+FFFD); other tokenizers decode through their own `decode`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megatron_sc2.data.fast_encoder import bytes_to_unicode
from megatron_sc2.data.tokenizer import Tokenizer




def _is_byte_level(decoder: Optional[dict]) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return decoder.get("type") == "Sequence" and any(d.get("type") == "ByteLevel" for d in decoder.get("decoders", []))


@dataclass
class TokenText:
    """Decodes token ids into the segments of plain text between special tokens."""

    tok: Tokenizer
    specials: np.ndarray = field(init=False)
    _flat: Optional[np.ndarray] = field(init=False, default=None)
    _start: Optional[np.ndarray] = field(init=False, default=None)
    _len: Optional[np.ndarray] = field(init=False, default=None)

    def __post_init__(self) -> None:
        specials = set(self.tok.special_ids.values()) | {self.tok.eod}
        if self.tok.backend == "hf":
            spec = json.loads(self.tok.hf.to_str())
            specials |= {int(a["id"]) for a in spec.get("added_tokens", []) if a.get("special")}
            vocab = spec.get("model", {}).get("vocab")
            if isinstance(vocab, dict) and _is_byte_level(spec.get("decoder")):
                self._byte_table(vocab, specials)
        self.specials = np.asarray(sorted(specials), dtype=np.int64)

    def _byte_table(self, vocab: dict[str, int], specials: set[int]) -> None:
        u2b = {u: b for b, u in bytes_to_unicode().items()}
        n = max(vocab.values()) + 1
        pieces = [b""] * n
        for s, i in vocab.items():
            if i in specials:
                continue
            try:
                pieces[i] = bytes(u2b[c] for c in s)
            except KeyError:
                return  # not a byte-level vocabulary after all: decode through the tokenizer
        self._len = np.asarray([len(p) for p in pieces], dtype=np.int64)
        self._start = np.zeros(n, dtype=np.int64)
        np.cumsum(self._len[:-1], out=self._start[1:])
        self._flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)

    def decode(self, ids: np.ndarray) -> str:
        """The text of ids holding no special token."""
        if not len(ids):
            return ""
        if self._flat is None:
            return self.tok.decode(np.asarray(ids).tolist())
        ids = np.asarray(ids, dtype=np.int64)
        if ids.max() >= len(self._len):
            return self.tok.decode(ids.tolist())
        lens = self._len[ids]
        total = int(lens.sum())
        ends = np.cumsum(lens)
        idx = np.arange(total, dtype=np.int64) + np.repeat(self._start[ids] - (ends - lens), lens)
        return self._flat[idx].tobytes().decode("utf-8", "replace")

    def segments(self, ids: np.ndarray) -> list[str]:
        """The texts between special tokens of one document (empty ones left out)."""
        ids = np.asarray(ids)
        cut = np.flatnonzero(np.isin(ids, self.specials))
        out = []
        a = 0
        for c in [*cut.tolist(), len(ids)]:
            if c > a:
                out.append(self.decode(ids[a:c]))
            a = c + 1
        return [s for s in out if s]

    def char_lengths(self) -> np.ndarray:
        """Per id, the characters its decoding alone gives (0 for special tokens): summed over a
        document, an upper bound of its text's length (a character split across tokens counts
        at least once on each side)."""
        if self._flat is not None:
            n = len(self._len)
            out = np.asarray([len(self._flat[self._start[i]:self._start[i] + self._len[i]].tobytes()
                                  .decode("utf-8", "replace")) for i in range(n)], dtype=np.int64)
        else:
            n = self.tok.vocab_size
            out = np.asarray([len(self.tok.decode([i])) for i in range(n)], dtype=np.int64)
        out[self.specials[self.specials < n]] = 0
        return out
