"""`megatron-sc2 preprocess` / `tools/preprocess_data.py`: a corpus to Megatron `.bin/.idx`.

Megatron's flags keep their meaning (`--input --output-prefix --json-keys --tokenizer-model
--append-eod --workers`): for JSON lines each line is one document whose `--json-keys` text is
tokenized as is, so the same input and tokenizer give the same bytes as Megatron's tool.
Documents are read as a stream, encoded in ordered chunks by `--workers` threads (the
encoders release the GIL) and written by one writer, so the output does not depend on the
worker count. Outputs appear under their final names only when complete.

Special-token text inside a document (code that quotes `<|endoftext|>` or `<fim_middle>`) is
encoded as ordinary text, so no document is cut or given FIM markers by its content; only
the separators we insert (and the appended end-of-document) are control tokens.
`--parse-special-tokens` restores Megatron's behaviour (such text becomes the control token),
the same ids as Megatron's tool on any corpus.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence

import numpy as np

from megatron_sc2.errors import CommandLineParser, ConfigError, DataError
from megatron_sc2.data.prep.corpus import Repository
from megatron_sc2.data.indexed import IndexedWriter, optimal_dtype
from megatron_sc2.data.provenance import ProvenanceWriter
from megatron_sc2.data.prep.repo_format import Special
from megatron_sc2.data.prep.sources import (SOURCE_FORMATS, Document, FileFilters, ReadStats, check_json_keys,
                                            expand_inputs, iter_documents, repository_documents)
from megatron_sc2.data.tokenizer import Tokenizer, load_tokenizer

CHUNK_CHARS = 1 << 20   # about 1 MB of text per encode task
CHUNK_DOCS = 1024
NAMED_SKIPS = 20  # skipped paths named in the summary (then a count of the rest)


@dataclass
class PreprocessSummary:
    outputs: dict[str, str]
    documents: int = 0
    tokens: int = 0
    seconds: float = 0.0
    read: ReadStats = field(default_factory=ReadStats)
    encoder: str = ""

    def lines(self) -> list[str]:
        r = self.read
        mb = r.input_bytes / 1e6
        rate = mb / self.seconds if self.seconds > 0 else float("inf")
        out = [f"documents: {self.documents:,}   tokens: {self.tokens:,}   input: {mb:.2f} MB in "
               f"{self.seconds:.1f} s ({rate:.2f} MB/s, encoder: {self.encoder})"]
        skipped = {k: v for k, v in asdict(r).items()
                   if k not in ("input_files", "input_bytes") and v}
        out.append("skipped: " + (", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in skipped.items())
                                  if skipped else "none"))
        for reason, path in r.skipped[:NAMED_SKIPS]:
            out.append(f"  skipped ({reason.replace('_', ' ')}): {path!r}"[:400])
        more = r.named_skips() - min(len(r.skipped), NAMED_SKIPS)
        if more > 0:
            out.append(f"  ... and {more:,} more skipped")
        for key, prefix in self.outputs.items():
            out.append(f"wrote {prefix}.bin / .idx / .prov")
        return out


class DocumentObserver(Protocol):
    """Something made from every document preprocess writes (the membership portrait of
    governance/, wired in from above by `megatron-sc2 preprocess --portrait`). `prepare` runs in
    the encoder threads on a document's tokens exactly as written (end-of-document included),
    `add` in the writer, in document order. It is a companion of the last output pair: staged
    and renamed with it, aborted with it (see `IndexedWriter`)."""

    def open(self, prefixes: Sequence[str], tok: Tokenizer) -> None: ...

    def prepare(self, ids: np.ndarray) -> Any: ...

    def add(self, prepared: Any) -> None: ...

    def stage(self) -> tuple[Optional[Path], Path]: ...

    def abort(self) -> None: ...


def _chunks(docs: Iterable[Document]) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    size = 0
    for d in docs:
        chunk.append(d)
        size += sum(len(t) for t in d.fields.values())
        if size >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def preprocess(output_prefix: str, tokenizer: Tokenizer | str, inputs: Sequence[str] = (),
               repositories: Optional[Iterable[Repository]] = None, json_keys: Sequence[str] = ("text",),
               append_eod: bool = False, workers: int = 1, repo_context: bool = False, seed: int = 1234,
               skip_malformed: bool = False, filters: Optional[FileFilters] = None,
               progress: bool = True, use_fast_encoder: bool = True,
               parse_special_tokens: bool = False,
               observers: Sequence[DocumentObserver] = ()) -> PreprocessSummary:
    """Tokenize `inputs` (paths/globs) or `repositories` into `{prefix}_{key}_document.bin/.idx`.

    Repository documents (directories, `repositories`, `repo_context`) always end in the
    end-of-document token, as StarCoder2's format has it. With `parse_special_tokens`
    (Megatron's behaviour) special-token text in documents becomes control tokens. Each of
    `observers` sees every written document's tokens (`DocumentObserver`)."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    tok.use_fast = use_fast_encoder
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if not inputs and repositories is None:
        raise ConfigError("nothing to preprocess: give --input")
    check_json_keys(json_keys)
    filters = filters or FileFilters()
    stats = ReadStats()
    sources = expand_inputs(inputs) if repositories is None else []  # a missing input fails before any output
    repo_like = repositories is not None or repo_context or any(SOURCE_FORMATS[k].repositories for k, _ in sources)
    if repo_like:
        missing = [n for n in ("repo_name", "file_sep") if n not in tok.special_ids]
        if missing:
            raise ConfigError(f"{tok.path}: repository documents need the tokens <repo_name> and "
                              f"<file_sep>, which this tokenizer lacks")
    keys = ["text"] if (repositories is not None or repo_context) else list(json_keys)
    if repositories is not None:
        docs: Iterable[Document] = repository_documents(iter(repositories), seed, filters, stats)
    else:
        docs = iter_documents(inputs, keys, repo_context, seed, skip_malformed, filters, stats)
    dtype = optimal_dtype(tok.vocab_size)
    outputs = {k: f"{output_prefix}_{k}_document" for k in keys}
    summary = PreprocessSummary(outputs=outputs, read=stats)
    fast = tok.fast_encoder()
    summary.encoder = "tiktoken (exact)" if fast is not None else tok.backend
    repo_tokens_ok = all(n in tok.special_ids for n in ("repo_name", "file_sep"))
    parse = parse_special_tokens

    def pieces_of(d: Document, key: str) -> list[str]:
        if d.pieces is not None and not parse:
            return d.pieces
        return [d.fields[key]]

    def assemble(pieces: list[str], ids: list[np.ndarray]) -> np.ndarray:
        """Ordinary pieces' ids with the separators' ids between them."""
        if len(pieces) == 1 and not isinstance(pieces[0], Special):
            return ids[0]
        parts, it = [], iter(ids)
        for piece in pieces:
            if isinstance(piece, Special):
                parts.append(np.asarray([tok.token_to_id(str(piece))], dtype=np.uint32))
            else:
                parts.append(next(it))
        return np.concatenate(parts) if parts else np.zeros(0, np.uint32)

    def encode_doc(d: Document, key: str) -> np.ndarray:
        pieces = pieces_of(d, key)
        ordinary = [p for p in pieces if not isinstance(p, Special)]
        return assemble(pieces, [np.asarray(tok.encode(t, parse), dtype=np.int64) for t in ordinary])

    def encode_texts(chunk: list[Document], key: str) -> list[list[int]]:
        try:
            per_doc = [pieces_of(d, key) for d in chunk]
            flat = [p for pieces in per_doc for p in pieces if not isinstance(p, Special)]
            ids = tok.encode_batch_np(flat, parse)
            out, at = [], 0
            for pieces in per_doc:
                n = sum(1 for p in pieces if not isinstance(p, Special))
                out.append(assemble(pieces, ids[at:at + n]))
                at += n
            return out
        except Exception:
            pass  # find the document at fault (e.g. a lone surrogate from a JSON escape)
        out = []
        for d in chunk:
            try:
                out.append(encode_doc(d, key))
            except Exception as e:
                if not skip_malformed:
                    raise DataError(f"{d.where}: cannot be tokenized ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                    "pass --skip-malformed to skip such documents") from None
                stats.malformed_lines += 1
                out.append(None)
        return out

    def encode(chunk: list[Document]) -> list[list[np.ndarray]]:
        per_key = [encode_texts(chunk, k) for k in keys]
        return [[per_key[j][i] for j in range(len(keys))] for i in range(len(chunk))]

    def as_written(doc: Document, ids: np.ndarray) -> np.ndarray:
        return np.append(ids, tok.eod) if len(ids) and (append_eod or doc.repo) else ids

    def encode_observed(chunk: list[Document]) -> tuple[list[list[np.ndarray]], list[list[Optional[list[Any]]]]]:
        encoded = encode(chunk)
        seen = [[None if ids is None else [o.prepare(as_written(doc, ids)) for o in observers] for ids in per_key]
                for doc, per_key in zip(chunk, encoded)]
        return encoded, seen

    from tqdm import tqdm

    total = None
    if sources and all(SOURCE_FORMATS[k].sized_by_file and p.suffix in (".jsonl", ".json") for k, p in sources):
        total = sum(p.stat().st_size for _, p in sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr,
               disable=True if not progress else None, mininterval=0.5, leave=False)  # None: off unless a TTY
    t0 = time.perf_counter()
    writers: dict[str, IndexedWriter] = {}
    sidecars: dict[str, ProvenanceWriter] = {}  # where each document came from (PREFIX.prov)
    file_sep, specials = tok.special_ids.get("file_sep"), sorted(set(tok.special_ids.values()))
    try:
        for o in observers:
            o.open([outputs[k] for k in keys], tok)
        for k in keys:
            sidecars[k] = ProvenanceWriter(outputs[k])
            last = [*observers] if k == keys[-1] else []  # appear with the last pair, when all are complete
            writers[k] = IndexedWriter(outputs[k], dtype, companions=[sidecars[k], *last])
    except BaseException as e:
        for w in [*writers.values(), *sidecars.values(), *observers]:
            w.abort()
        bar.close()
        if isinstance(e, OSError):
            raise DataError(f"cannot write {outputs[k]}.bin: {e.strerror or e}") from None
        raise
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque = deque()
            last_bytes = 0

            def drain_one() -> None:
                nonlocal last_bytes
                chunk, fut = pending.popleft()
                encoded, seen = fut.result() if observers else (fut.result(), None)
                for i, (doc, ids_per_key) in enumerate(zip(chunk, encoded)):
                    if any(ids is None for ids in ids_per_key):
                        continue  # could not be tokenized; counted as malformed
                    if all(len(ids) == 0 for ids in ids_per_key):
                        if skip_malformed:
                            stats.empty_documents += 1
                            continue
                        raise DataError(f"{doc.where}: empty document (no text to tokenize); "
                                        "pass --skip-malformed to skip such documents")
                    if doc.repo and not repo_tokens_ok:
                        raise ConfigError(f"{tok.path}: repository documents ({doc.where}) need the tokens "
                                          "<repo_name> and <file_sep>, which this tokenizer lacks")
                    for k, ids in zip(keys, ids_per_key):
                        if len(ids) and (append_eod or doc.repo):
                            writers[k].add_document_parts(ids, tok.eod)
                            summary.tokens += len(ids) + 1
                        else:
                            writers[k].add_document(ids)
                            summary.tokens += len(ids)
                        sidecars[k].add_document(doc.origin, doc.where, ids, doc.repo, file_sep, specials)
                    if seen is not None:
                        for per_observer in seen[i]:
                            for o, prepared in zip(observers, per_observer):
                                o.add(prepared)
                    summary.documents += 1
                bar.update(stats.input_bytes - last_bytes)
                last_bytes = stats.input_bytes

            task = encode_observed if observers else encode
            for chunk in _chunks(docs):
                pending.append((chunk, pool.submit(task, chunk)))
                while len(pending) > 2 * workers:
                    drain_one()
            while pending:
                drain_one()
        if summary.documents == 0:
            raise DataError(f"no documents to write from {', '.join(map(str, inputs)) or 'the repositories'} "
                            "(all inputs empty, malformed or filtered)")
        for w in writers.values():
            w.finalize()  # its sidecar is replaced in the same window as the pair
    finally:
        bar.close()
        for w in [*writers.values(), *sidecars.values()]:
            if not w._done:
                w.abort()
        if not all(w._done for w in writers.values()):
            for o in observers:
                o.abort()
    summary.seconds = time.perf_counter() - t0
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = CommandLineParser(prog="megatron-sc2 preprocess", description=__doc__.splitlines()[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True,
                   help="JSONL (plain/.gz/.zst), parquet, directories of repositories; globs allowed")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from JSON lines")
    g.add_argument("--split-sentences", action="store_true", help="(Megatron) not supported here")
    g.add_argument("--keep-newlines", action="store_true", help="(Megatron) accepted; newlines are always kept")
    g.add_argument("--repo-context", action="store_true",
                   help="group consecutive JSON lines with the same repo_name into StarCoder2 repository documents")
    g.add_argument("--seed", type=int, default=1234, help="seed of the repository-document layout")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-model", required=True, help="tokenizer.json, HF tokenizer directory or SentencePiece .model")
    g.add_argument("--tokenizer-type", default=None,
                   help="(Megatron) accepted: HuggingFaceTokenizer, SentencePieceTokenizer, GPTSentencePieceTokenizer")
    g.add_argument("--vocab-file", default=None, help="(Megatron) use --tokenizer-model instead")
    g.add_argument("--merge-file", default=None, help="(Megatron) use --tokenizer-model instead")
    g.add_argument("--append-eod", action="store_true", help="append <|endoftext|> to each document")
    g.add_argument("--no-fast-encoder", action="store_true", help="always encode with `tokenizers`")
    g.add_argument("--parse-special-tokens", action="store_true",
                   help="Megatron's behaviour: special-token text inside documents (e.g. <|endoftext|> quoted "
                        "in code) becomes that control token; by default it is encoded as ordinary text")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True)
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="encoder threads")
    g.add_argument("--partitions", type=int, default=1, help="(Megatron) accepted, output is one file")
    g.add_argument("--log-interval", type=int, default=1000, help="(Megatron) accepted")
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("filters (off by default)")
    g.add_argument("--skip-malformed", action="store_true",
                   help="skip malformed/non-UTF-8 lines and empty documents (counted) instead of stopping")
    g.add_argument("--max-file-size", type=int, default=None, help="drop files larger than this many bytes")
    g.add_argument("--max-line-length", type=int, default=None, help="drop files with a longer line")
    g.add_argument("--min-alphanum-fraction", type=float, default=None,
                   help="drop files with a smaller fraction of alphanumeric characters")
    g.add_argument("--dedup", action="store_true", help="drop exact duplicate files (content hash)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace, observers: Sequence[DocumentObserver] = ()) -> int:
    """The command on parsed flags (`megatron-sc2 preprocess` adds `--portrait` above this)."""
    if args.split_sentences:
        raise ConfigError("--split-sentences is not supported (code has no sentences)")
    if args.vocab_file or args.merge_file:
        if not args.tokenizer_model:
            raise ConfigError("--vocab-file/--merge-file: pass the tokenizer directory with --tokenizer-model")
    if args.tokenizer_type not in (None, "HuggingFaceTokenizer", "SentencePieceTokenizer",
                                   "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        raise ConfigError(f"--tokenizer-type {args.tokenizer_type} is not supported; "
                          "use HuggingFaceTokenizer or SentencePieceTokenizer with --tokenizer-model")
    filters = FileFilters(args.max_file_size, args.max_line_length, args.min_alphanum_fraction, args.dedup)
    summary = preprocess(args.output_prefix, args.tokenizer_model, inputs=args.input, json_keys=args.json_keys,
                         append_eod=args.append_eod, workers=args.workers, repo_context=args.repo_context,
                         seed=args.seed, skip_malformed=args.skip_malformed, filters=filters,
                         progress=not args.no_progress, use_fast_encoder=not args.no_fast_encoder,
                         parse_special_tokens=args.parse_special_tokens, observers=observers)
    for line in summary.lines():
        print(line, file=sys.stderr)
    return 0
