"""Reading and writing the model part of our DCP checkpoints a few tensors at a time.

Reading: DCP loads exactly the keys of the state dict it is given, reassembling each global
tensor from whatever shards (TP/PP/FSDP chunks) the training layout stored, so asking for a
handful of keys per call streams the model whatever layout wrote it.

Writing: `dcp.save` wants the whole state dict up front, but it only needs shapes and dtypes to
plan; the bytes are fetched per write item through `SavePlanner.resolve_data`. We hand it meta
tensors and a planner whose `resolve_data` produces each real tensor on demand, and ask for one
file per tensor so that the writer drops each tensor once its file is written.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItem

from megatron_sc2.errors import CheckpointError
from megatron_sc2.training.checkpoint import load_dcp, read_dcp_metadata

MODEL_PREFIX = "model."


@dataclass(frozen=True)
class TensorSpec:
    name: str  # our FQN (without the "model." state-dict prefix)
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def read_model_specs(ckpt: Path) -> dict[str, TensorSpec]:
    """Names, global shapes and dtypes of the model tensors in a DCP checkpoint directory."""
    md = read_dcp_metadata(ckpt)  # never unpickles anything but DCP's own metadata classes
    out: dict[str, TensorSpec] = {}
    for key, item in md.state_dict_metadata.items():
        if key.startswith(MODEL_PREFIX) and isinstance(item, TensorStorageMetadata):
            name = key[len(MODEL_PREFIX):]
            out[name] = TensorSpec(name, tuple(item.size), item.properties.dtype)
    if not out:
        raise CheckpointError(f"{ckpt}: the checkpoint holds no model tensors")
    return out


def batched(specs: Iterable[TensorSpec], budget_bytes: int) -> Iterator[list[TensorSpec]]:
    """Groups of consecutive tensors whose total size stays within the budget (a tensor larger
    than the budget travels alone)."""
    group: list[TensorSpec] = []
    size = 0
    for s in specs:
        if group and size + s.nbytes > budget_bytes:
            yield group
            group, size = [], 0
        group.append(s)
        size += s.nbytes
    if group:
        yield group


def iter_model_tensors(ckpt: Path, specs: list[TensorSpec], budget_bytes: int = 256 << 20,
                       dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full tensor) in the order of `specs`, loading a few per DCP call.

    With `dtype`, tensors are loaded straight into buffers of that dtype (DCP's copy into the
    destination does the cast), saving a separate conversion pass and its memory."""
    for group in batched(specs, budget_bytes):
        sd = {"model": {s.name: torch.empty(s.shape, dtype=dtype or s.dtype) for s in group}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
            load_dcp(sd, Path(ckpt), no_dist=True)
        tensors = sd["model"]
        del sd
        for s in group:
            yield s.name, tensors.pop(s.name)


class _OnDemandSavePlanner(DefaultSavePlanner):
    """Plans from meta tensors; produces each real tensor only when the writer asks for it."""

    def __init__(self, fetch: Callable[[str], torch.Tensor]):
        super().__init__()
        self._fetch = fetch

    def resolve_data(self, write_item: WriteItem):  # type: ignore[override]
        fqn = write_item.index.fqn
        if not fqn.startswith(MODEL_PREFIX):
            return super().resolve_data(write_item)
        return self._fetch(fqn[len(MODEL_PREFIX):])


def save_model_streaming(out_dir: Path, specs: list[TensorSpec],
                         fetch: Callable[[str], torch.Tensor]) -> None:
    """Write {"model": {...}} as a DCP checkpoint into `out_dir`, calling `fetch(name)` for
    each tensor as it is written (in `specs` order); peak memory is about one tensor."""
    with torch.device("meta"):
        meta_sd = {"model": {s.name: torch.empty(s.shape, dtype=s.dtype) for s in specs}}
    # One file per tensor: with one file per rank, the writer keeps every tensor of the file
    # alive until the file is closed.
    # Files are fsynced together at the end rather than one by one, so the disk writes back
    # while the next tensors are read; the checkpoint is durable before this returns.
    writer = FileSystemWriter(str(out_dir), single_file_per_rank=False, thread_count=1,
                              sync_files=False, overwrite=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(meta_sd, storage_writer=writer, planner=_OnDemandSavePlanner(fetch), no_dist=True)
    for f in sorted(Path(out_dir).iterdir()):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def iter_own_files_mmap(ckpt: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for a checkpoint written by `save_model_streaming` (one tensor per
    file), each file memory-mapped by `torch.load` — the bytes DCP itself would `torch.load`,
    without a second in-memory copy. Used to verify what was just written at low peak memory."""
    md = read_dcp_metadata(ckpt)
    for index, info in (md.storage_data or {}).items():
        if not index.fqn.startswith(MODEL_PREFIX):
            continue
        path = ckpt / info.relative_path
        if info.offset != 0 or info.length != path.stat().st_size or getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{path}: not a one-tensor file as written by the converter")
        try:
            t = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except (RuntimeError, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: cannot be read back ({str(e).splitlines()[0]})") from None
        yield index.fqn[len(MODEL_PREFIX):], t
        del t


__all__ = ["TensorSpec", "read_model_specs", "iter_model_tensors", "save_model_streaming",
           "batched", "iter_own_files_mmap"]
