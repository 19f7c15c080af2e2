"""`megatron-sc2 remove --data-path PREFIX --repos FILE --output-prefix OUT`: opt-out removal.

Writes a dataset without every document whose provenance names one of the listed repositories
(exact names, one per line; blank lines and `#` comments ignored), with its provenance sidecar,
and reports what went. Every other document is copied as it was (tokens and sequence lengths),
in order. The portrait and search index are then rebuilt from the output. Needs the provenance
sidecar: without it no document can be told apart, and that is an error naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_sc2.data.indexed import IndexedDataset, IndexedWriter, strip_suffix
from megatron_sc2.data.provenance import ProvenanceWriter, require_provenance
from megatron_sc2.errors import ConfigError, DataError


@dataclass
class RemovalReport:
    output: str
    documents_in: int
    documents_out: int
    tokens_removed: int
    removed: dict[str, int] = field(default_factory=dict)   # repository -> documents removed
    not_found: list[str] = field(default_factory=list)      # listed, but in no document

    def lines(self) -> list[str]:
        out = [f"removed {self.documents_in - self.documents_out:,} of {self.documents_in:,} documents "
               f"({self.tokens_removed:,} tokens) from {len(self.removed)} repositories -> {self.output}.bin/.idx/.prov"]
        out += [f"  {name}: {n} document(s)" for name, n in sorted(self.removed.items())]
        if self.not_found:
            out.append(f"not found in the dataset: {', '.join(self.not_found)}")
        return out


def read_repo_list(path: str | Path) -> list[str]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{p}: repository list not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 (byte {e.start})") from None
    names = [line.strip() for line in text.splitlines()]
    return [n for n in names if n and not n.startswith("#")]


def remove_repositories(prefix: str, repos: Sequence[str], output_prefix: str) -> RemovalReport:
    ds = IndexedDataset(strip_suffix(prefix))
    prov = require_provenance(ds.prefix, ds.num_documents, "needed to know each document's repository")
    out = strip_suffix(output_prefix)
    if Path(out).resolve() == Path(ds.prefix).resolve():
        raise ConfigError(f"--output-prefix {out} is the input dataset; write a new one")
    wanted = set(repos)
    removed: Counter[str] = Counter()
    tokens_removed = 0
    seq_starts = ds.document_indices
    pw = ProvenanceWriter(out)
    try:
        w = IndexedWriter(out, ds.dtype, companions=[pw])
    except BaseException:
        pw.abort()
        raise
    with w:
        for d in range(ds.num_documents):
            repo = prov.record(d).get("repository")
            if repo in wanted:
                removed[repo] += 1
                tokens_removed += int(ds.sequence_lengths[seq_starts[d]:seq_starts[d + 1]].sum(dtype=np.int64))
                continue
            lengths = ds.sequence_lengths[seq_starts[d]:seq_starts[d + 1]]
            w.add_document(ds.document(d), sequence_lengths=lengths.tolist())
            pw.add_raw(prov.raw(d))
        w.finalize()  # the sidecar is replaced with the pair
    kept = ds.num_documents - sum(removed.values())
    return RemovalReport(out, ds.num_documents, kept, tokens_removed, dict(removed),
                         [r for r in repos if r not in removed])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-sc2 remove", description=__doc__.splitlines()[0])
    p.add_argument("--data-path", required=True, help="dataset prefix (with its .prov sidecar)")
    p.add_argument("--repos", required=True, help="file of repository names to remove, one per line")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = p.parse_args(argv)
    repos = read_repo_list(args.repos)
    report = remove_repositories(args.data_path, repos, args.output_prefix)
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        for line in report.lines():
            print(line, file=sys.stderr)
    return 0
