"""An exact fast encoder: tiktoken's BPE built from a Hugging Face byte-level BPE vocabulary.

tiktoken merges any adjacent pair whose concatenation is in the vocabulary (lowest rank
first); `tokenizers` merges only the listed merge pairs (lowest merge index first). With
ranks = ids and ids rising with the merge index (true for StarCoder2: merge i makes id
280 + i), the two agree on a pre-tokenized piece as long as tiktoken never takes an unlisted
pair. We precompute, for every token t, whether tiktoken's run on t's own bytes uses only
listed merges and ends in [t] ("clean"). If every token tiktoken outputs for a piece is
clean, its merges inside each output token's span are that token's own run (spans never
interact: a pair crossing a final boundary is never taken), all listed, so at every step
the globally smallest candidate was a listed one and `tokenizers` took the same step. An
output holding any unclean token is re-encoded with `tokenizers`. Texts with characters
whose bytes have no token, or lone surrogates, also go to `tokenizers`. The pre-tokenizer
(single digits, GPT-2's regex) is one tiktoken pattern (DESIGN.md); its equality and the
whole encoder's are tested id for id against `tokenizers` on the standard library.

Anything else the construction cannot express (normalizers, other pre-tokenizers, byte
fallback, non-special added tokens, ...) makes `build_fast_encoder` return None and
encoding stays with `tokenizers`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

import regex

from megatron_sc2.data.special_tokens import STARCODER2_SPLIT_PATTERN

CLEAN_CACHE_VERSION = "1"
GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _pattern_for(pre: Optional[dict]) -> Optional[str]:
    """The single split pattern equal to this pre-tokenizer, or None if we have none."""
    if pre is None:
        return None

    def is_bytelevel(p: dict) -> bool:
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and p.get("use_regex", True))

    if is_bytelevel(pre):
        return GPT2_SPLIT_PATTERN
    if pre.get("type") == "Sequence":
        items = pre.get("pretokenizers", [])
        if (len(items) == 2 and items[0].get("type") == "Digits" and items[0].get("individual_digits")
                and is_bytelevel(items[1])):
            return STARCODER2_SPLIT_PATTERN
    return None


def _simulate(token: bytes, ranks: dict[bytes, int], first_merge: dict[int, tuple[int, int]],
              token_id: int) -> bool:
    """tiktoken's merge loop on `token`'s bytes: only listed merges, and ending in [token]?"""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best < 0:
            return False
        left, right = ranks[parts[best]], ranks[parts[best + 1]]
        if first_merge.get(best_rank) != (left, right):
            return False
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return ranks.get(parts[0]) == token_id


@dataclass
class FastEncoder:
    """tiktoken for the bulk, `tokenizers` for the texts it cannot vouch for."""

    encoding: Any
    hf: Any
    clean: np.ndarray               # bool per id
    risky_chars: Any                # compiled regex: characters needing the fallback
    stats: dict[str, int] = field(default_factory=lambda: {"texts": 0, "fallback": 0})

    def __post_init__(self) -> None:
        self.all_clean = bool(self.clean.all())  # StarCoder2: every token is clean
        self._specials = set(self.encoding.special_tokens_set)
        self._hf_plain = None

    def _hf_ordinary(self):
        """A copy of the `tokenizers` object that encodes special-token text as text."""
        if self._hf_plain is None:
            from tokenizers import Tokenizer as HFTokenizer

            impl = HFTokenizer.from_str(self.hf.to_str())
            impl.encode_special_tokens = True
            self._hf_plain = impl
        return self._hf_plain

    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        return self.encode_batch([text], parse_special)[0]

    def encode_batch(self, texts: Sequence[str], parse_special: bool = True) -> list[list[int]]:
        return [a.tolist() for a in self.encode_arrays(texts, parse_special)]

    def _tiktoken_array(self, text: str, allowed: set[str]) -> np.ndarray:
        core = getattr(self.encoding, "_core_bpe", None)
        if core is not None and hasattr(core, "encode_to_tiktoken_buffer"):
            # uint32 buffer straight from Rust: no Python int list (the GIL stays released longer)
            return np.frombuffer(core.encode_to_tiktoken_buffer(text, allowed), dtype=np.uint32)
        if allowed:
            return np.asarray(self.encoding.encode(text, allowed_special="all"), dtype=np.uint32)
        return np.asarray(self.encoding.encode_ordinary(text), dtype=np.uint32)

    def encode_arrays(self, texts: Sequence[str], parse_special: bool = True) -> list[np.ndarray]:
        """Ids of each text as a uint32 array (the preprocessing fast path). With
        `parse_special=False` special-token text is ordinary text, here and in the fallback."""
        allowed = self._specials if parse_special else set()
        out: list[Optional[np.ndarray]] = []
        redo: list[int] = []
        for i, text in enumerate(texts):
            if self.risky_chars is not None and self.risky_chars.search(text, concurrent=True):
                out.append(None)
                redo.append(i)
                continue
            ids = self._tiktoken_array(text, allowed)
            if not self.all_clean and ids.size and not self.clean[ids].all():
                out.append(None)
                redo.append(i)
                continue
            out.append(ids)
        if redo:
            hf = self.hf if parse_special else self._hf_ordinary()
            encs = hf.encode_batch_fast([texts[i] for i in redo], add_special_tokens=False)
            for i, e in zip(redo, encs):
                out[i] = np.asarray(e.ids, dtype=np.uint32)
        self.stats["texts"] += len(texts)
        self.stats["fallback"] += len(redo)
        return out  # type: ignore[return-value]


def build_fast_encoder(tokenizer) -> Optional[FastEncoder]:
    """A FastEncoder equal to `tokenizer` id for id, or None when that cannot be guaranteed."""
    try:
        import tiktoken
    except ImportError:
        return None
    hf = tokenizer.hf
    text = hf.to_str()
    spec = json.loads(text)
    model = spec.get("model", {})
    if (model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or spec.get("normalizer") is not None or model.get("ignore_merges")):
        return None
    pattern = _pattern_for(spec.get("pre_tokenizer"))
    if pattern is None:
        return None
    added = spec.get("added_tokens", [])
    if any(not a.get("special") or a.get("lstrip") or a.get("rstrip") or a.get("single_word")
           or a.get("normalized") for a in added):
        return None
    specials = {a["content"]: int(a["id"]) for a in added}
    b2u = bytes_to_unicode()
    u2b = {c: b for b, c in b2u.items()}
    vocab: dict[str, int] = model["vocab"]
    ranks: dict[bytes, int] = {}
    for s, i in vocab.items():
        if s in specials:
            continue
        try:
            ranks[bytes(u2b[c] for c in s)] = int(i)
        except KeyError:
            return None  # a token outside the byte alphabet
    if len(set(ranks.values())) != len(ranks) or set(ranks.values()) & set(specials.values()):
        return None
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    first_merge: dict[int, tuple[int, int]] = {}
    last = -1
    for a, b in merges:
        if a not in vocab or b not in vocab or a + b not in vocab:
            return None
        t = vocab[a + b]
        if t in first_merge:
            continue
        if t <= last:
            return None  # ids do not rise with merge order: ids cannot serve as ranks
        last = t
        first_merge[t] = (vocab[a], vocab[b])
    n_ids = max(list(ranks.values()) + list(specials.values())) + 1
    clean = _load_clean(text, n_ids)
    if clean is None:
        clean = np.zeros(n_ids, dtype=bool)
        for tok_bytes, i in ranks.items():
            clean[i] = len(tok_bytes) == 1 or _simulate(tok_bytes, ranks, first_merge, i)
        for i in specials.values():
            clean[i] = True
        _save_clean(text, clean)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    risky = _risky_char_class(missing)
    try:
        enc = tiktoken.Encoding(name=f"megatron_sc2:{tokenizer.path}", pat_str=pattern,
                                mergeable_ranks=ranks, special_tokens=specials)
    except Exception:
        return None
    return FastEncoder(enc, hf, clean, risky)


def _clean_cache_path(tokenizer_json: str) -> Path:
    digest = hashlib.sha256((CLEAN_CACHE_VERSION + tokenizer_json).encode("utf-8", "surrogatepass")).hexdigest()[:32]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megatron_sc2" / "fast_encoder"
    return root / f"{digest}.npy"


def _load_clean(tokenizer_json: str, n_ids: int) -> Optional[np.ndarray]:
    """The per-token check costs seconds for a 49k vocabulary; keep it per tokenizer content."""
    try:
        arr = np.load(_clean_cache_path(tokenizer_json))
    except (OSError, ValueError):
        return None
    return arr if arr.dtype == bool and arr.shape == (n_ids,) else None


def _save_clean(tokenizer_json: str, clean: np.ndarray) -> None:
    path = _clean_cache_path(tokenizer_json)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npy")
        np.save(tmp, clean)
        os.replace(tmp, path)
    except OSError:
        pass


def _risky_char_class(missing_bytes: list[int]):
    """A regex matching characters whose UTF-8 holds a byte without a token (tokenizers drops
    those bytes; tiktoken cannot encode them), and lone surrogates (tokenizers raises)."""
    ranges = ["\\ud800-\\udfff"]
    for b in missing_bytes:
        if b < 0x80:
            ranges.append(regex.escape(chr(b)))
        elif 0xC2 <= b <= 0xDF:    # lead of a 2-byte character
            lo = (b & 0x1F) << 6
            ranges.append(f"\\u{lo:04x}-\\u{lo + 0x3F:04x}")
        elif 0xE0 <= b <= 0xEF:    # lead of a 3-byte character
            lo = max((b & 0x0F) << 12, 0x800)
            ranges.append(f"\\u{lo:04x}-\\u{(b & 0x0F) * 0x1000 + 0xFFF:04x}")
        elif 0xF0 <= b <= 0xF4:    # lead of a 4-byte character
            lo = (b & 0x07) << 18
            ranges.append(f"\\U{max(lo, 0x10000):08x}-\\U{lo + 0x3FFFF:08x}")
        elif 0x80 <= b <= 0xBF:    # a continuation byte: too many characters; give up on speed
            return regex.compile(r"[^\x00-\x7f]")
        # 0xC0, 0xC1, 0xF5..0xFF never occur in UTF-8
    return regex.compile("[" + "".join(ranges) + "]")
