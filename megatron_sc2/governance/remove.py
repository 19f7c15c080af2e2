"""`megatron-sc2 remove --data-path PREFIX --repos FILE --output-prefix OUT`: opt-out removal.

Writes a dataset without every document whose provenance names one of the listed repositories
(exact names, one per line; blank lines and `#` comments ignored), with its provenance sidecar,
and reports what went. Every other document is copied as it was (tokens and sequence lengths),
in order. The portrait and search index are then rebuilt from the output. Needs the provenance
sidecar: without it no document can be told apart, and that is an error naming the file.

At scale: `--shard i/N` (or `auto` in a slurm array task) filters only shard i's contiguous run
of documents (the rule of the other sharded builds) into `OUT.shard-0000i-of-0000N.bin/.idx/.prov`
and its part of the report into `OUT.shard-0000i-of-0000N.json`, which is written last and also
records which dataset and repository list the shard came from. A shard already done from the
same inputs is skipped; otherwise it is overwritten. `--merge` (the same flags) checks that
every shard is there and came from these inputs, joins them in order into OUT (byte for byte
what one process writes) and prints the summed report. It is our own step, not `megatron-sc2
merge`, because only it can tell a missing, stale or foreign shard and sum the reports.
`--submit-shards N` queues the N tasks as a job array and the merge as a job after them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from megatron_sc2.data.indexed import IndexedDataset, IndexedWriter, strip_suffix
from megatron_sc2.data.prep.merge import merge_datasets
from megatron_sc2.data.provenance import Provenance, ProvenanceWriter, provenance_path, require_provenance
from megatron_sc2.errors import CommandLineParser, ConfigError, DataError
from megatron_sc2.governance.shards import add_submit_flags, document_ranges, parse_shard, submit_main

SHARD_FORMAT = "megatron_sc2.remove-shard"
SHARD_VERSION = 1


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


def _open_input(prefix: str, output_prefix: str) -> tuple[IndexedDataset, Provenance, str]:
    ds = IndexedDataset(strip_suffix(prefix))
    prov = require_provenance(ds.prefix, ds.num_documents, "needed to know each document's repository")
    out = strip_suffix(output_prefix)
    if Path(out).resolve() == Path(ds.prefix).resolve():
        raise ConfigError(f"--output-prefix {out} is the input dataset; write a new one")
    return ds, prov, out


def _filter(ds: IndexedDataset, prov: Provenance, repos: Sequence[str], first: int, end: int,
            out: str) -> RemovalReport:
    """Copy documents [first, end) but the listed repositories' into the dataset `out`."""
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
        for d in range(first, end):
            repo = prov.record(d).get("repository")
            lengths = ds.sequence_lengths[seq_starts[d]:seq_starts[d + 1]]
            if repo in wanted:
                removed[repo] += 1
                tokens_removed += int(lengths.sum(dtype=np.int64))
                continue
            w.add_document(ds.document(d), sequence_lengths=lengths.tolist())
            pw.add_raw(prov.raw(d))
        w.finalize()  # the sidecar is replaced with the pair
    n = end - first
    return RemovalReport(out, n, n - sum(removed.values()), tokens_removed, dict(removed),
                         [r for r in repos if r not in removed])


def remove_repositories(prefix: str, repos: Sequence[str], output_prefix: str) -> RemovalReport:
    ds, prov, out = _open_input(prefix, output_prefix)
    return _filter(ds, prov, repos, 0, ds.num_documents, out)


# -- shards --------------------------------------------------------------------------------

def shard_prefix(output_prefix: str, shard: int, num_shards: int) -> str:
    return f"{strip_suffix(output_prefix)}.shard-{shard:05d}-of-{num_shards:05d}"


def shard_report_path(output_prefix: str, shard: int, num_shards: int) -> Path:
    return Path(shard_prefix(output_prefix, shard, num_shards) + ".json")


def _identity(ds: IndexedDataset, repos: Sequence[str]) -> dict[str, Any]:
    """What a shard was made from: the dataset (path, counts, its files' sizes and modification
    times; reading a big corpus again to hash it would cost as much as the removal) and a hash
    of the repository list as read."""
    files = {}
    for p in (ds.bin_path, ds.idx_path, provenance_path(ds.prefix)):
        st = os.stat(p)
        files[p.suffix] = [st.st_size, st.st_mtime_ns]
    return {"dataset": str(Path(ds.prefix).resolve()), "documents": ds.num_documents, "tokens": ds.num_tokens,
            "files": files, "repos_sha256": hashlib.sha256("\n".join(repos).encode("utf-8")).hexdigest()}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_shard_report(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{path}: corrupt shard report (not JSON)") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT or meta.get("version") != SHARD_VERSION:
        raise DataError(f"{path}: not a `remove --shard` report (format {SHARD_FORMAT} v{SHARD_VERSION})")
    return meta


def _check_shard_pair(prefix: str, meta: dict[str, Any]) -> None:
    """The shard's .bin/.idx/.prov hold what its report says they hold."""
    ds = IndexedDataset(prefix)
    Provenance(provenance_path(prefix), ds.num_documents)
    if ds.num_documents != meta["report"]["documents_out"] or ds.num_tokens != meta["tokens_out"]:
        raise DataError(f"{ds.idx_path}: holds {ds.num_documents} documents / {ds.num_tokens} tokens but its report "
                        f"says {meta['report']['documents_out']} / {meta['tokens_out']}; re-run this shard")


def remove_shard(prefix: str, repos: Sequence[str], output_prefix: str, shard: int,
                 num_shards: int) -> tuple[RemovalReport, bool]:
    """Shard `shard` of `num_shards`: (its report, True when it was already done and skipped)."""
    ds, prov, out = _open_input(prefix, output_prefix)
    ident = _identity(ds, repos)
    sp, rp = shard_prefix(out, shard, num_shards), shard_report_path(out, shard, num_shards)
    ranges = document_ranges([ds], shard, num_shards)
    first, end = (ranges[0][1], ranges[0][2]) if ranges else (ds.num_documents * shard // num_shards,) * 2
    if rp.exists():
        try:
            meta = _read_shard_report(rp)
            if meta["source"] == ident and meta["shard"] == [shard, num_shards] and meta["documents"] == [first, end]:
                _check_shard_pair(sp, meta)
                return RemovalReport(**meta["report"]), True
        except (DataError, KeyError, TypeError, ValueError, OSError):
            pass  # not a finished shard of these inputs: made again
        rp.unlink()  # the report goes first: a shard's files are only trusted beside their report
    report = _filter(ds, prov, repos, first, end, sp)
    tokens_out = int(ds.sequence_lengths[ds.document_indices[first]:ds.document_indices[end]].sum(dtype=np.int64)) \
        - report.tokens_removed
    _write_json(rp, {"format": SHARD_FORMAT, "version": SHARD_VERSION, "shard": [shard, num_shards],
                     "documents": [first, end], "tokens_out": tokens_out, "source": ident, "report": asdict(report)})
    return report, False


def _count_shards(out: str) -> int:
    """N of the shard reports found beside `out` (all must agree)."""
    base = Path(out)
    pat = re.compile(re.escape(base.name) + r"\.shard-(\d{5})-of-(\d{5})\.json")
    found = {int(m.group(2)) for p in (base.parent.iterdir() if base.parent.is_dir() else ())
             if (m := pat.fullmatch(p.name))}
    if not found:
        raise DataError(f"{out}.shard-*-of-*.json: no shards to merge (run `remove --shard i/N` first)")
    if len(found) > 1:
        raise DataError(f"{out}.shard-*: shards of runs with different shard counts {sorted(found)}; "
                        "give --num-shards or delete the stale ones")
    return found.pop()


def merge_shards(prefix: str, repos: Sequence[str], output_prefix: str,
                 num_shards: Optional[int] = None) -> RemovalReport:
    """Join every shard, in order, into `output_prefix`; refuse a missing, stale or foreign one
    before anything is written."""
    ds, _, out = _open_input(prefix, output_prefix)
    if num_shards is not None and num_shards < 1:
        raise ConfigError(f"--num-shards must be at least 1, got {num_shards}")
    n = num_shards or _count_shards(out)
    missing = [shard_report_path(out, i, n) for i in range(n) if not shard_report_path(out, i, n).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: missing ({len(missing)} of {n} shards not done yet)")
    ident = _identity(ds, repos)
    removed: Counter[str] = Counter()
    docs_out = tokens_removed = 0
    for i in range(n):
        rp = shard_report_path(out, i, n)
        meta = _read_shard_report(rp)
        try:
            src, rep, span = meta["source"], meta["report"], meta["documents"]
            if src.get("dataset") != ident["dataset"]:
                raise DataError(f"{rp}: shard of another dataset ({src.get('dataset')}), not {ident['dataset']}")
            if src.get("repos_sha256") != ident["repos_sha256"]:
                raise DataError(f"{rp}: shard made with another repository list; re-run it with this --repos")
            if src != ident:
                raise DataError(f"{rp}: shard of {ident['dataset']} as it was before it changed "
                                "(sizes or modification times differ); re-run the shards")
            expect = [ds.num_documents * i // n, ds.num_documents * (i + 1) // n]
            if meta["shard"] != [i, n] or span != expect or rep["documents_in"] != expect[1] - expect[0]:
                raise DataError(f"{rp}: covers documents {span}, not shard {i}/{n}'s {expect}")
            _check_shard_pair(shard_prefix(out, i, n), meta)
            removed.update(rep["removed"])
            docs_out += rep["documents_out"]
            tokens_removed += rep["tokens_removed"]
        except (KeyError, TypeError, AttributeError):
            raise DataError(f"{rp}: corrupt shard report (fields missing)") from None
    merge_datasets([shard_prefix(out, i, n) for i in range(n)], out)
    return RemovalReport(out, ds.num_documents, docs_out, tokens_removed, dict(removed),
                         [r for r in repos if r not in removed])


# -- command line --------------------------------------------------------------------------

def _submit(args: argparse.Namespace, repos: Sequence[str]) -> int:
    if args.shard is not None or args.merge:
        raise ConfigError("--submit-shards excludes --shard and --merge (the array tasks and the merge job get them)")
    ds, _, out = _open_input(args.data_path, args.output_prefix)  # bad inputs fail now, not in the queue
    common = ["--data-path", str(Path(ds.prefix).resolve()), "--repos", str(Path(args.repos).resolve()),
              "--output-prefix", str(Path(out).resolve())] + (["--json"] if args.json else [])
    return submit_main("remove", args, common, [*common, "--merge", "--num-shards", str(args.submit_shards)],
                       logs=Path(f"{out}.slurm"), build_sub=(), merge_sub=())


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = CommandLineParser(prog="megatron-sc2 remove", description=__doc__.splitlines()[0])
    p.add_argument("--data-path", required=True, help="dataset prefix (with its .prov sidecar)")
    p.add_argument("--repos", required=True, help="file of repository names to remove, one per line")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--shard", default=None,
                   help="i/N: only shard i of N (0-based) into OUT.shard-i-of-N; auto: the slurm array task's")
    p.add_argument("--merge", action="store_true", help="join the finished shards into OUT")
    p.add_argument("--num-shards", type=int, default=None, help="with --merge: the expected number of shards")
    add_submit_flags(p)
    args = p.parse_args(argv)
    if args.shard is not None and args.merge:
        raise ConfigError("--shard and --merge exclude each other (merge after every shard is done)")
    if args.num_shards is not None and not args.merge:
        raise ConfigError("--num-shards goes with --merge")
    repos = read_repo_list(args.repos)
    if args.submit_shards is not None:
        return _submit(args, repos)
    skipped = False
    shard = parse_shard(args.shard)
    if shard is not None:
        report, skipped = remove_shard(args.data_path, repos, args.output_prefix, *shard)
    elif args.merge:
        report = merge_shards(args.data_path, repos, args.output_prefix, args.num_shards)
    else:
        report = remove_repositories(args.data_path, repos, args.output_prefix)
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        for line in report.lines():
            print(line, file=sys.stderr)
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]}: {'already done from these inputs, skipped' if skipped else 'done'}",
              file=sys.stderr)
    return 0
