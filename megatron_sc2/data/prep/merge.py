"""`megatron-sc2 merge`: several `.bin/.idx` datasets into one (like Megatron's
tools/merge_datasets.py): documents in input order, token dtype kept, written under a
temporary name and renamed when complete."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_sc2.errors import CommandLineParser, ConfigError, DataError
from megatron_sc2.data.indexed import IndexedDataset, IndexedWriter, strip_suffix
from megatron_sc2.data.provenance import NoProvenance, merge_provenance


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> IndexedDataset:
    if not prefixes:
        raise ConfigError("nothing to merge: give at least one input dataset")
    datasets = [IndexedDataset(p) for p in prefixes]
    dtype = datasets[0].dtype
    for d in datasets:
        if not np.issubdtype(d.dtype, np.integer):
            raise DataError(f"{d.idx_path}: token dtype {np.dtype(d.dtype).name} cannot hold token ids")
    for d in datasets[1:]:
        if d.dtype != dtype:
            raise DataError(f"{d.idx_path}: token dtype {d.dtype.__name__} differs from "
                            f"{datasets[0].idx_path} ({dtype.__name__}); made with different tokenizers?")
    out = strip_suffix(output_prefix)
    if any(Path(strip_suffix(p)).resolve() == Path(out).resolve() for p in prefixes):
        raise ConfigError(f"--output-prefix {out} is also an input")
    # the provenance sidecars travel along (a stale one at the output goes)
    prov = merge_provenance([d.prefix for d in datasets], [d.num_documents for d in datasets], out)
    try:
        with IndexedWriter(out, dtype, companions=[prov if prov is not None else NoProvenance(out)]) as w:
            for d in datasets:
                w.add_index(d)
            w.finalize()
    except BaseException:
        if prov is not None:
            prov.abort()
        raise
    return IndexedDataset(out)


def _inputs_from_dir(directory: Path) -> list[str]:
    idx = sorted(directory.glob("*.idx"))
    if not idx:
        raise DataError(f"{directory}: no .idx files to merge")
    return [str(p.with_suffix("")) for p in idx]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = CommandLineParser(prog="megatron-sc2 merge", description=__doc__.splitlines()[0])
    p.add_argument("--input", help="(Megatron) a directory: every PREFIX.idx/.bin pair in it, sorted by name")
    p.add_argument("--inputs", nargs="+", help="dataset prefixes to merge, in order")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    prefixes = list(args.inputs or [])
    if args.input:
        prefixes = _inputs_from_dir(Path(args.input)) + prefixes
    merged = merge_datasets(prefixes, args.output_prefix)
    print(f"merged {len(prefixes)} datasets: {merged.num_documents:,} documents, {merged.num_tokens:,} tokens "
          f"-> {merged.prefix}.bin/.idx", file=sys.stderr)
    return 0
