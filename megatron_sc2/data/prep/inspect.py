"""`megatron-sc2 inspect PREFIX`: what a `.bin/.idx` dataset holds -- documents, tokens,
a document length histogram, token range -- and, with `--decode N`, document N as text with
its provenance (source, repository, files) when the dataset has a `.prov` sidecar."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from megatron_sc2.errors import CommandLineParser, ConfigError
from megatron_sc2.data.indexed import IndexedDataset
from megatron_sc2.data.provenance import open_provenance


def describe(ds: IndexedDataset, bins: int = 10) -> list[str]:
    doc_lengths = np.diff(np.concatenate([[0], np.cumsum(ds.sequence_lengths, dtype=np.int64)])[ds.document_indices])
    lines = [
        f"dataset:   {ds.prefix}.bin / .idx",
        f"dtype:     {np.dtype(ds.dtype).name}",
        f"documents: {ds.num_documents:,}   sequences: {len(ds):,}   tokens: {ds.num_tokens:,}",
    ]
    if ds.num_documents:
        lines.append(f"doc length: min {doc_lengths.min():,}  median {int(np.median(doc_lengths)):,}  "
                     f"mean {doc_lengths.mean():,.1f}  max {doc_lengths.max():,}")
        lo, hi = ds.token_range()
        lines.append(f"token ids: min {lo:,}  max {hi:,}")
        edges = np.unique(np.geomspace(1, max(2, doc_lengths.max() + 1), bins + 1).astype(np.int64))
        counts, edges = np.histogram(doc_lengths, bins=edges)
        width = max(counts.max(), 1)
        lines.append("length histogram (tokens per document):")
        for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
            lines.append(f"  [{lo:>9,} , {hi:>9,})  {c:>9,}  {'#' * int(40 * c / width)}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = CommandLineParser(prog="megatron-sc2 inspect", description=__doc__.splitlines()[0])
    p.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--decode", type=int, action="append", default=[], metavar="N", help="print document N")
    p.add_argument("--tokenizer-model", help="tokenizer to decode with (else ids are printed)")
    p.add_argument("--max-chars", type=int, default=2000)
    args = p.parse_args(argv)
    ds = IndexedDataset(args.prefix)
    for line in describe(ds):
        print(line)
    prov = open_provenance(ds.prefix, ds.num_documents) if args.decode else None
    tok = None
    if args.decode and args.tokenizer_model:
        from megatron_sc2.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer_model)
        ds.check_token_ids(tok.vocab_size)  # a float, negative or too large id cannot be decoded
    for n in args.decode:
        if not 0 <= n < ds.num_documents:
            raise ConfigError(f"--decode {n}: the dataset has documents 0..{ds.num_documents - 1}")
        ids = ds.document(n)
        print(f"--- document {n}: {len(ids):,} tokens")
        for line in (prov[n].describe() if prov is not None else ["provenance: none (no .prov sidecar)"]):
            print(line)
        if tok is not None:
            text = tok.decode(ids.tolist())
            print(text[: args.max_chars] + ("..." if len(text) > args.max_chars else ""))
        else:
            print(" ".join(map(str, ids[: args.max_chars].tolist())))
    return 0
