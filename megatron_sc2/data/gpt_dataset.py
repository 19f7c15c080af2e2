"""Megatron's packed GPT samples over one `.bin/.idx` split.

Documents are shuffled (document index), packed back to back and cut into samples of
seq_length + 1 tokens where consecutive samples share one token (sample index), and the
samples are shuffled (shuffle index) -- the same three indices megatron-core's `GPTDataset`
builds, with the same NumPy random stream, so sample i here is sample i there. The sample
index is computed vectorized (one searchsorted) instead of a C++ loop.

Indices are cached as .npy files under a key that covers the data files' size and
modification time and every option that changes sample boundaries; with torch.distributed
initialized, rank 0 builds them and the other ranks wait, then load.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_sc2.data.indexed import IndexedDataset

INDEX_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SampleSpec:
    """Everything that decides sample boundaries for one split of one dataset."""

    prefix: str
    split_name: str
    doc_begin: int
    doc_end: int
    num_samples: Optional[int]
    seq_length: int
    seed: int


def num_epochs_for(tokens_per_epoch: int, num_samples: Optional[int], seq_length: int) -> int:
    """Epochs needed for `num_samples` samples (Megatron's `_get_num_epochs`)."""
    if num_samples is None:
        return 1
    needed = num_samples * seq_length + 1
    if tokens_per_epoch <= 0:
        raise ValueError("no tokens in this split")
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    if not separate_final_epoch or num_epochs == 1:
        idx = np.tile(documents.astype(np.int32), num_epochs)
        rng.shuffle(idx)
        return idx
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_epochs: int, tokens_per_epoch: int) -> np.ndarray:
    """(num_samples + 1, 2) of (position in document_index, token offset): sample k starts at
    global token k * seq_length of the packed stream (samples overlap by one token)."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    lengths = sizes[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    starts_pos = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    doc = np.searchsorted(ends, starts_pos, side="right")
    offset = starts_pos - (ends[doc] - lengths[doc])
    dtype = np.int32 if max(len(document_index), int(sizes.max(initial=0))) <= np.iinfo(np.int32).max else np.int64
    out = np.empty((num_samples + 1, 2), dtype=dtype)
    out[:, 0] = doc
    out[:, 1] = offset
    return out


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(0, num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_indices(sizes: np.ndarray, spec: SampleSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Document, sample and shuffle indices exactly as megatron-core's GPTDataset builds them."""
    documents = np.arange(spec.doc_begin, spec.doc_end, dtype=np.int32)
    tokens_per_epoch = int(sizes[spec.doc_begin:spec.doc_end].sum(dtype=np.int64))
    num_epochs = num_epochs_for(tokens_per_epoch, spec.num_samples, spec.seq_length)
    separate_final_epoch = False
    if num_epochs > 1:
        sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // spec.seq_length
        from_final = spec.num_samples - sans_final
        per_epoch = (tokens_per_epoch - 1) // spec.seq_length
        separate_final_epoch = from_final < int(0.80 * per_epoch)
    rng = np.random.RandomState(spec.seed)
    doc_idx = build_document_index(documents, num_epochs, rng, separate_final_epoch)
    sample_idx = build_sample_index(sizes, doc_idx, spec.seq_length, num_epochs, tokens_per_epoch)
    n = sample_idx.shape[0] - 1
    shuffle_idx = build_shuffle_index(sans_final if separate_final_epoch else n, n, rng)
    return doc_idx, sample_idx, shuffle_idx


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(spec: SampleSpec, dataset: IndexedDataset) -> tuple[str, dict]:
    description = {
        "format": INDEX_FORMAT_VERSION, "kind": "GPTSampleDataset",
        "spec": spec.__dict__, "bin": _file_stamp(dataset.bin_path), "idx": _file_stamp(dataset.idx_path),
        "add_extra_token": True, "drop_last_partial_sequence": True,
    }
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32], description


def _dist_rank_and_barrier():
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, lambda: None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.barrier
    return 0, lambda: None


def load_or_build_indices(dataset: IndexedDataset, spec: SampleSpec,
                          cache_dir: Optional[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cached indices when a cache entry with the same key exists, else build (rank 0) and save."""
    if cache_dir is None:
        return build_indices(dataset.sequence_lengths, spec)
    key, description = cache_key(spec, dataset)
    base = Path(cache_dir) / f"{key}-{spec.split_name}"
    paths = {n: Path(f"{base}-{n}.npy") for n in ("document_index", "sample_index", "shuffle_index")}
    desc_path = Path(f"{base}-description.json")
    rank, barrier = _dist_rank_and_barrier()

    def cached() -> bool:
        if not desc_path.is_file() or not all(p.is_file() for p in paths.values()):
            return False
        try:
            stored = json.loads(desc_path.read_text())
            sums = stored.pop("checksums")
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            return False
        return stored == json.loads(json.dumps(description)) and isinstance(sums, dict)

    def load_verified() -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The cached arrays if each still has the checksum written beside it, else None."""
        try:
            sums = json.loads(desc_path.read_text())["checksums"]
            arrays = tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in paths.values())
        except (OSError, ValueError, KeyError, TypeError, EOFError):
            return None
        if any(sums.get(n) != _checksum(a) for n, a in zip(paths, arrays)):
            return None
        return arrays  # type: ignore[return-value]

    if rank == 0 and (not cached() or load_verified() is None):
        if desc_path.is_file():
            print(f"warning: cached sample index {base} is stale or corrupt (checksum); rebuilding it",
                  file=sys.stderr)
        arrays = build_indices(dataset.sequence_lengths, spec)
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            desc_path.unlink(missing_ok=True)  # the entry is incomplete until the description is back
            for (name, p), arr in zip(paths.items(), arrays):
                tmp = p.with_name(p.name + f".tmp-{os.getpid()}.npy")
                np.save(tmp, arr)
                os.replace(tmp, p)
            tmp = desc_path.with_name(desc_path.name + f".tmp-{os.getpid()}")
            full = dict(description, checksums={n: _checksum(a) for n, a in zip(paths, arrays)})
            tmp.write_text(json.dumps(full, sort_keys=True, indent=1))
            os.replace(tmp, desc_path)  # written last: marks the entry complete
        except OSError:
            pass  # read-only data directory: every rank builds for itself below
        barrier()
        return arrays
    barrier()
    if cached():
        arrays = load_verified()
        if arrays is not None:
            return arrays
    return build_indices(dataset.sequence_lengths, spec)


def _checksum(arr: np.ndarray) -> str:
    """sha256 of an index array's dtype, shape and bytes: a cached index overwritten with other
    values is rebuilt, never trusted."""
    h = hashlib.sha256(f"{np.dtype(arr.dtype).str}{tuple(arr.shape)}".encode())
    h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
    return h.hexdigest()


class GPTSampleDataset:
    """Samples of seq_length + 1 tokens from one split of one `.bin/.idx` dataset."""

    def __init__(self, dataset: IndexedDataset, spec: SampleSpec, cache_dir: Optional[Path]):
        self.dataset = dataset
        self.spec = spec
        self.document_index, self.sample_index, self.shuffle_index = load_or_build_indices(dataset, spec, cache_dir)

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def __getitem__(self, idx: int) -> np.ndarray:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range ({len(self)} samples)")
        i = int(self.shuffle_index[idx])
        doc_beg, off_beg = (int(x) for x in self.sample_index[i])
        doc_end, off_end = (int(x) for x in self.sample_index[i + 1])
        if doc_beg == doc_end:
            parts = [self.dataset.get(int(self.document_index[doc_beg]), off_beg, off_end - off_beg + 1)]
        else:
            parts = [self.dataset.get(int(self.document_index[doc_beg]), off_beg)]
            for d in range(doc_beg + 1, doc_end):
                parts.append(self.dataset.get(int(self.document_index[d])))
            parts.append(self.dataset.get(int(self.document_index[doc_end]), 0, off_end + 1))
        out = np.concatenate(parts).astype(np.int64)
        assert out.shape[0] == self.spec.seq_length + 1
        return out
