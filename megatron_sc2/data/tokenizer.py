"""One tokenizer interface over Hugging Face `tokenizers` files and SentencePiece models.

The ids are those of the Hugging Face tokenizer (what Megatron's `HuggingFaceTokenizer` and
`transformers` produce). A faster exact encoder (`fast_encoder.py`) is used for batches when it
can prove it reproduces these ids; otherwise encoding stays with `tokenizers`.

Special-token text (`parse_special=False`): `tokenizers` encodes it as text with its own
`encode_special_tokens` switch; a SentencePiece model uses a copy in which its special-token-like
user-defined symbols can no longer be produced (`sentencepiece_text.py`), its control symbols
being text already.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_sc2.errors import DataError
from megatron_sc2.data.special_tokens import EOD_TOKEN, NAMED_SPECIALS


@dataclass
class Tokenizer:
    """A loaded tokenizer. `backend` is "hf" (a `tokenizers.Tokenizer`) or "sentencepiece"."""

    path: Path
    backend: str
    vocab_size: int
    eod: int
    special_ids: dict[str, int]
    _impl: Any = field(repr=False)
    _fast: Any = field(default=None, repr=False)
    _fast_checked: bool = field(default=False, repr=False)
    _impl_ordinary: Any = field(default=None, repr=False)
    _sp_plain: Any = field(default=None, repr=False)
    _sp_plain_checked: bool = field(default=False, repr=False)
    use_fast: bool = True

    # -- encoding --------------------------------------------------------------------------
    # `parse_special=True` (HF's and Megatron's behaviour): special-token text inside the text
    # becomes that control token. `parse_special=False`: it is encoded as the ordinary text it
    # is, so code quoting `<|endoftext|>` is not cut into two documents (preprocessing's default).
    # SentencePiece: `parse_special=True` is the model as it is (user-defined symbols match
    # anywhere); `False` writes its special-token-like user-defined symbols (`<...>`) as their
    # characters (byte fallback where the vocabulary lacks one) and keeps other user-defined
    # symbols (whitespace runs, digits) as vocabulary. Control symbols never match text.
    def encode(self, text: str, parse_special: bool = True) -> list[int]:
        """Ids of `text`, no BOS/EOS added. `parse_special=False`: special-token text is text,
        for SentencePiece its `<...>` user-defined symbols too (see the comment above)."""
        if self.backend == "hf":
            return self._hf_for(parse_special).encode(text, add_special_tokens=False).ids
        plain = None if parse_special else self._sp_plain_encoder()
        if plain is not None:
            return list(plain.encode([text])[0])
        return list(self._impl.encode(text))

    def encode_batch(self, texts: Sequence[str], parse_special: bool = True) -> list[list[int]]:
        """Ids of each text; identical to `encode` on each, faster."""
        texts = list(texts)
        if self.backend != "hf":
            plain = None if parse_special else self._sp_plain_encoder()
            if plain is not None:
                return [list(ids) for ids in plain.encode(texts)]
            return [list(ids) for ids in self._impl.encode(texts)]
        fast = self.fast_encoder()
        if fast is not None:
            return fast.encode_batch(texts, parse_special)
        return [e.ids for e in self._hf_for(parse_special).encode_batch_fast(texts, add_special_tokens=False)]

    def encode_batch_np(self, texts: Sequence[str], parse_special: bool = True) -> list["np.ndarray"]:
        """Like `encode_batch`, as integer arrays (no Python int lists on the fast path)."""
        import numpy as np

        fast = self.fast_encoder()
        if fast is not None:
            return fast.encode_arrays(list(texts), parse_special)
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts, parse_special)]

    def _hf_for(self, parse_special: bool):
        """The `tokenizers` object for this mode: a second copy with `encode_special_tokens`
        set encodes special-token text as text (a copy, so threads never share a toggled flag)."""
        if parse_special:
            return self._impl
        if self._impl_ordinary is None:
            from tokenizers import Tokenizer as HFTokenizer

            impl = HFTokenizer.from_str(self._impl.to_str())
            impl.encode_special_tokens = True
            self._impl_ordinary = impl
        return self._impl_ordinary

    def _sp_plain_encoder(self):
        """The SentencePiece model that writes special-token text as text, or None when the
        model has no such symbol (then it already does)."""
        if not self._sp_plain_checked:
            from megatron_sc2.data.sentencepiece_text import plain_text_encoder

            self._sp_plain = plain_text_encoder(self._impl, str(self.path))
            self._sp_plain_checked = True
        return self._sp_plain

    def encode_batch_hf(self, texts: Sequence[str]) -> list[list[int]]:
        """Reference path: `tokenizers`' own batch encoder (used to check the fast one)."""
        if self.backend != "hf":
            return self.encode_batch(texts)
        return [e.ids for e in self._impl.encode_batch_fast(list(texts), add_special_tokens=False)]

    def fast_encoder(self):
        """The exact tiktoken-based encoder when this vocabulary allows one, else None."""
        if not self.use_fast or self.backend != "hf":
            return None
        if not self._fast_checked:
            self._fast_checked = True
            from megatron_sc2.data.fast_encoder import build_fast_encoder

            self._fast = build_fast_encoder(self)
        return self._fast

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.backend == "hf":
            return self._impl.decode(ids, skip_special_tokens=False)
        return self._impl.decode(ids)

    def token_to_id(self, token: str) -> Optional[int]:
        if self.backend == "hf":
            return self._impl.token_to_id(token)
        i = self._impl.piece_to_id(token)
        return None if i == self._impl.unk_id() and token != self._impl.id_to_piece(i) else i

    @property
    def hf(self):
        """The underlying `tokenizers.Tokenizer` (hf backend only)."""
        if self.backend != "hf":
            raise DataError(f"{self.path}: not a Hugging Face tokenizer")
        return self._impl

    # -- saving ----------------------------------------------------------------------------
    def save_hf(self, directory: str | os.PathLike) -> Path:
        """Write files `transformers.AutoTokenizer.from_pretrained(directory)` loads, with
        bos = eos = unk = the end-of-document token."""
        if self.backend != "hf":
            # transformers 5 reads a bare tokenizer.model only through converters that need
            # protobuf and fit few SentencePiece set-ups: refuse rather than write files that
            # would load wrongly.
            raise DataError(f"{self.path}: exporting a SentencePiece tokenizer to Hugging Face files is not "
                            "supported; convert it to a tokenizer.json first")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        eod_text = self._id_to_token(self.eod)
        self._impl.save(str(out / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": eod_text, "eos_token": eod_text, "unk_token": eod_text,
            "model_max_length": 1000000000000000019884624838656,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False, "add_eos_token": False,
        }
        special_map = {"bos_token": eod_text, "eos_token": eod_text, "unk_token": eod_text}
        additional = [t for t in self._specials_in_vocab() if t != eod_text]
        if additional:
            config["additional_special_tokens"] = additional
            special_map["additional_special_tokens"] = additional
        _write_json(out / "tokenizer_config.json", config)
        _write_json(out / "special_tokens_map.json", special_map)
        return out

    def _id_to_token(self, i: int) -> str:
        if self.backend == "hf":
            return self._impl.id_to_token(i)
        return self._impl.id_to_piece(i)

    def _specials_in_vocab(self) -> list[str]:
        if self.backend != "hf":
            return []
        added = self._impl.get_added_tokens_decoder()
        return [tok.content for _, tok in sorted(added.items()) if tok.special]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _resolve(path: Path) -> tuple[str, Path]:
    """Which backend and which file a user's path names."""
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return "hf", path / "tokenizer.json"
        if (path / "tokenizer.model").is_file():
            return "sentencepiece", path / "tokenizer.model"
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return "hf-vocab-merges", path
        raise DataError(
            f"{path}: no tokenizer.json, tokenizer.model or vocab.json+merges.txt in this directory")
    if path.suffix == ".model":
        return "sentencepiece", path
    return "hf", path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a `tokenizer.json`, a Hugging Face tokenizer directory or a SentencePiece `.model`."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"tokenizer not found: {p}")
    kind, file = _resolve(p)
    if kind in ("hf", "hf-vocab-merges"):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            if kind == "hf":
                impl = HFTokenizer.from_file(str(file))
            else:
                from tokenizers.models import BPE
                from tokenizers import pre_tokenizers, decoders

                impl = HFTokenizer(BPE.from_file(str(file / "vocab.json"), str(file / "merges.txt")))
                impl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                impl.decoder = decoders.ByteLevel()
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise DataError(f"{file}: not a readable Hugging Face tokenizer ({_first_line(e)})") from None
        vocab_size = impl.get_vocab_size(with_added_tokens=True)
        eod = impl.token_to_id(EOD_TOKEN)
        if eod is None:
            eod = _eos_from_config(p if p.is_dir() else p.parent, impl)
        lookup = impl.token_to_id
        backend = "hf"
    else:
        import sentencepiece as spm

        try:
            impl = spm.SentencePieceProcessor(model_file=str(file))
        except Exception as e:
            raise DataError(f"{file}: not a readable SentencePiece model ({_first_line(e)})") from None
        vocab_size = impl.get_piece_size()
        eod = impl.piece_to_id(EOD_TOKEN)
        if impl.id_to_piece(eod) != EOD_TOKEN:
            eod = impl.eos_id() if impl.eos_id() >= 0 else None

        def lookup(tok: str) -> Optional[int]:
            i = impl.piece_to_id(tok)
            return i if impl.id_to_piece(i) == tok else None

        backend = "sentencepiece"
    if eod is None:
        raise DataError(
            f"{file}: the tokenizer has no end-of-document token ({EOD_TOKEN} or an eos token); "
            "documents could not be separated")
    special_ids = {"eod": int(eod)}
    for name, text in NAMED_SPECIALS.items():
        if name == "eod":
            continue
        i = lookup(text)
        if i is not None:
            special_ids[name] = int(i)
    return Tokenizer(path=p.resolve(), backend=backend, vocab_size=int(vocab_size), eod=int(eod),
                     special_ids=special_ids, _impl=impl)


def _eos_from_config(directory: Path, impl) -> Optional[int]:
    """A tokenizer directory may name its end-of-document token in tokenizer_config.json."""
    cfg = directory / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    eos = data.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return impl.token_to_id(eos) if isinstance(eos, str) else None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
