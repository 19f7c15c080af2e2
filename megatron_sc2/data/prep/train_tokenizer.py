"""`megatron-sc2 train-tokenizer`: a byte-level BPE with StarCoder2's special tokens and
pre-tokenizer, trained on a corpus (the demo trains one on the Python standard library).

The result is a `tokenizer.json` (plus `tokenizer_config.json`) in the output directory with
the 38 special tokens at ids 0..37, the 256 byte symbols next, then the learned merges.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from megatron_sc2.errors import CommandLineParser, ConfigError, DataError
from megatron_sc2.data.special_tokens import STARCODER2_SPECIAL_TOKENS


def _new_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike,
                    min_frequency: int = 2) -> Path:
    """Train on `texts`; write `output_dir/tokenizer.json` (+ HF config files); return the dir."""
    from tokenizers import pre_tokenizers, trainers

    n_special = len(STARCODER2_SPECIAL_TOKENS)
    if vocab_size < n_special + 256:
        raise ConfigError(
            f"--vocab-size {vocab_size} is too small: it needs at least {n_special + 256} "
            f"({n_special} special tokens and 256 byte symbols)")
    tok = _new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(STARCODER2_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    for i, text in enumerate(STARCODER2_SPECIAL_TOKENS):
        if tok.token_to_id(text) != i:
            raise AssertionError(f"special token {text} did not land on id {i}")
    out = Path(output_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tok.save(str(tmp / "tokenizer.json"))
    from megatron_sc2.data.tokenizer import load_tokenizer

    load_tokenizer(tmp / "tokenizer.json").save_hf(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    n = 0
    for t in texts:
        if t:
            n += 1
            yield t
    if n == 0:
        raise DataError("train-tokenizer: the corpus is empty (no text to learn from)")


def _iter_input_texts(inputs: Sequence[str], json_key: str) -> Iterator[str]:
    """Texts from JSONL files (its `json_key`), directories of repositories or the stdlib."""
    from megatron_sc2.data.prep import sources

    for spec in inputs:
        if spec == "stdlib":
            from megatron_sc2.data.prep.corpus import iter_stdlib_repositories

            for _, files in iter_stdlib_repositories():
                for _, text in files:
                    yield text
            continue
        yield from sources.iter_texts([spec], json_key)  # a repository directory: its files' texts


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = CommandLineParser(prog="megatron-sc2 train-tokenizer", description=__doc__)
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL files (plain/.gz/.zst), directories of repositories, or 'stdlib'")
    p.add_argument("--output", required=True, help="output directory (tokenizer.json + HF files)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--json-key", default="text")
    p.add_argument("--min-frequency", type=int, default=2)
    args = p.parse_args(argv)
    out = train_tokenizer(_iter_input_texts(args.input, args.json_key), args.vocab_size,
                          args.output, min_frequency=args.min_frequency)
    print(f"tokenizer written to {out / 'tokenizer.json'}")
    return 0
