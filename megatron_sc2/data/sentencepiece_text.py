"""Special-token text as ordinary text for SentencePiece models (`parse_special=False`).

SentencePiece matches a user-defined symbol wherever its text occurs in the input and has no
encoding option to stop that (`set_vocabulary` leaves user-defined pieces alone); control
symbols are never matched from text at all. So the plain-text processor is the same model in
which the special-token-like user-defined pieces are UNUSED pieces with the lowest score:
SentencePiece's own mechanism for pieces that must never be produced (BPE splits an unused piece
back into the pieces it was merged from, after every other merge; unigram and word models skip
it). Normalization, the dummy prefix and all other pieces and ids are unchanged, so a text that
holds no such string gets exactly the ids of the original model, and a text that does gets the
ids of the same model without those pieces: the characters' own pieces (byte fallback for
characters outside the vocabulary). The lowest score matters for BPE: at its own score (0, the
highest) the unused piece would be formed first and hold its characters away from merges with
their neighbours before being split back.

Which user-defined symbols are special-token text: those written like a markup token, `<` ...
`>` with no whitespace inside (`<|endoftext|>`, `<fim_prefix>`, `<file_sep>`, `<start_of_turn>`).
Other user-defined symbols (whitespace runs, digits, keywords that a code vocabulary forces) are
vocabulary and stay matched, as `tokenizers` keeps matching non-special added tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_sc2.errors import DataError

USER_DEFINED = 4  # sentencepiece_model.proto: ModelProto.SentencePiece.Type
UNUSED = 5
LOWEST_SCORE = -3.0e38  # formed last in BPE, so it never takes a merge from its neighbours


def is_special_like(piece: str) -> bool:
    """A user-defined symbol that reads as a special token: `<...>`, no whitespace inside."""
    return (len(piece) >= 3 and piece[0] == "<" and piece[-1] == ">"
            and not any(c.isspace() or c == "\u2581" for c in piece))


@dataclass(frozen=True)
class PlainTextEncoder:
    """Encodes special-token text as the characters it is; see the module docstring."""

    processor: Any                   # sentencepiece.SentencePieceProcessor of the edited model
    symbols: dict[str, int]          # symbol text -> its id in the original model
    unspellable: tuple[str, ...]     # symbols this model can only write with <unk> (no byte fallback)
    source: str                      # the model file, for messages

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if self.unspellable:
            for text in texts:
                for s in self.unspellable:
                    if s in text:
                        raise DataError(
                            f"{self.source}: cannot write {s!r} in the text as ordinary text (no byte "
                            "fallback: it would become <unk>); parse special tokens (preprocess "
                            "--parse-special-tokens) or use a model trained with byte_fallback")
        return self.processor.encode(list(texts))


def plain_text_encoder(processor: Any, source: str) -> Optional[PlainTextEncoder]:
    """The plain-text encoder for `processor`, or None when it has no special-token-like
    user-defined symbol (then the original model already encodes such text as text)."""
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    symbols: dict[str, int] = {}
    for i, piece in enumerate(proto.pieces):
        if piece.type == USER_DEFINED and is_special_like(piece.piece):
            symbols[piece.piece] = i
            piece.type = UNUSED
            piece.score = LOWEST_SCORE
    if not symbols:
        return None
    edited = SentencePieceProcessor(model_proto=proto.SerializeToString())
    unk = edited.unk_id()
    unspellable = tuple(s for s in symbols if unk in edited.encode(s))
    return PlainTextEncoder(processor=edited, symbols=symbols, unspellable=unspellable, source=source)
