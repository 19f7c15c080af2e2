"""Fill-in-the-middle as StarCoder2 trained it, applied to packed samples.

Per document (the sample split at `<|endoftext|>`) with probability `rate`, then per file
chunk (the document split at `<file_sep>`) again with probability `rate`, a chunk's text is
cut at two uniform character positions into prefix/middle/suffix and rearranged as
PSM `<fim_prefix>pre<fim_suffix>suf<fim_middle>mid` or (probability `spm_rate`) SPM
`<fim_prefix><fim_suffix>suf<fim_middle>pre mid`. A leading `<repo_name>name` chunk is never
transformed. The sample keeps seq_length + 1 tokens: a chunk that grew gives up the excess
from the end of its suffix, and the sample is padded at the end with `<fim_pad>`.

Every random draw comes from a generator seeded by (seed, split, sample index) alone, so a
sample is the same in any process, with any number of workers, before and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_sc2.errors import ConfigError

_FIM_STREAM = 0x46494D  # "FIM": keeps this generator apart from any other use of the seed


@dataclass(frozen=True)
class FimIds:
    prefix: int
    middle: int
    suffix: int
    pad: int
    eod: int
    file_sep: int
    repo_name: int

    @staticmethod
    def from_tokenizer(tokenizer) -> "FimIds":
        need = ("fim_prefix", "fim_middle", "fim_suffix", "fim_pad", "file_sep", "repo_name")
        missing = [n for n in need if n not in tokenizer.special_ids]
        if missing:
            raise ConfigError(f"--fim-rate > 0 needs the tokenizer's {', '.join('<' + m + '>' for m in missing)} "
                              f"tokens, which {tokenizer.path} lacks")
        s = tokenizer.special_ids
        return FimIds(s["fim_prefix"], s["fim_middle"], s["fim_suffix"], s["fim_pad"], tokenizer.eod,
                      s["file_sep"], s["repo_name"])


def sample_rng(seed: int, split_id: int, index: int) -> np.random.Generator:
    return np.random.default_rng([_FIM_STREAM, int(seed), int(split_id), int(index)])


def _split_keep(tokens: list[int], sep: int) -> list[list[int]]:
    """Pieces between separators (separators not included); len(pieces) = count(sep) + 1."""
    pieces: list[list[int]] = [[]]
    for t in tokens:
        if t == sep:
            pieces.append([])
        else:
            pieces[-1].append(t)
    return pieces


def transform_chunk(chunk: list[int], tokenizer, ids: FimIds, spm_rate: float,
                    rng: np.random.Generator) -> list[int]:
    """One file chunk rearranged (or unchanged when its text does not round-trip exactly)."""
    text = tokenizer.decode(chunk)
    lo, hi = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    spm = bool(rng.random() < spm_rate)
    if not text or tokenizer.encode(text) != chunk:
        return chunk
    pre, mid, suf = tokenizer.encode_batch([text[:lo], text[lo:hi], text[hi:]])
    excess = 3 + len(pre) + len(mid) + len(suf) - len(chunk)
    if excess > 0:
        if excess > len(suf):
            return chunk
        suf = suf[: len(suf) - excess]
    if spm:
        return [ids.prefix, ids.suffix] + suf + [ids.middle] + pre + mid
    return [ids.prefix] + pre + [ids.suffix] + suf + [ids.middle] + mid


def transform_document(doc: list[int], tokenizer, ids: FimIds, rate: float, spm_rate: float,
                       rng: np.random.Generator) -> list[int]:
    chunks = _split_keep(doc, ids.file_sep)
    out: list[int] = []
    for k, chunk in enumerate(chunks):
        if k > 0:
            out.append(ids.file_sep)
        transformable = bool(chunk) and not (k == 0 and chunk[0] == ids.repo_name)
        if transformable and rng.random() < rate:
            chunk = transform_chunk(chunk, tokenizer, ids, spm_rate, rng)
        out.extend(chunk)
    return out


def apply_fim(sample: np.ndarray, tokenizer, ids: FimIds, rate: float, spm_rate: float,
              rng: np.random.Generator) -> np.ndarray:
    """The FIM version of one packed sample, same length."""
    n = int(sample.shape[0])
    docs = _split_keep(sample.tolist(), ids.eod)
    out: list[int] = []
    for k, doc in enumerate(docs):
        if k > 0:
            out.append(ids.eod)
        if doc and rng.random() < rate:
            doc = transform_document(doc, tokenizer, ids, rate, spm_rate, rng)
        out.extend(doc)
    if len(out) > n:  # cannot happen (chunks never grow), kept as a guard
        out = out[:n]
    out.extend([ids.pad] * (n - len(out)))
    return np.asarray(out, dtype=np.int64)


class FimDataset:
    """Wraps a sample dataset; sample i is FIM-transformed by a generator seeded by (seed, split, i)."""

    def __init__(self, base, tokenizer, rate: float, spm_rate: float, seed: int, split_id: int):
        self.base, self.tokenizer = base, tokenizer
        self.rate, self.spm_rate, self.seed, self.split_id = rate, spm_rate, seed, split_id
        self.ids = FimIds.from_tokenizer(tokenizer)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int) -> np.ndarray:
        return apply_fim(self.base[idx], self.tokenizer, self.ids, self.rate, self.spm_rate,
                         sample_rng(self.seed, self.split_id, idx))
