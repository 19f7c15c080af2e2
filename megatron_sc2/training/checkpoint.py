"""Checkpoints: torch.distributed.checkpoint directories that load under any layout.

Layout of a save directory (see the format notes in the README):

    SAVE/iter_0000100/            DCP files (.metadata, *.distcp) for {"model": ..., "optimizer": ...}
    SAVE/iter_0000100/meta.json   iteration, consumed samples, model and train config, tokenizer
    SAVE/iter_0000100/rng/        per-rank RNG state
    SAVE/iter_0000100/tokenizer/  a copy of the run's tokenizer files (meta.json points here)
    SAVE/iter_0000100/complete    written last; a directory without it is never loaded
    SAVE/latest_checkpointed_iteration.txt   Megatron's name, replaced atomically

A checkpoint is written under `iter_XXXXXXX.tmp-<nonce>` and renamed once every rank has
finished, so a kill at any moment leaves the previous checkpoint as the latest loadable one.

A checkpoint is a file people download and share, so reading one never runs its content:
RNG state is tensors and plain numbers (`torch.load(weights_only=True)`), DCP's `.metadata`
pickle goes through an unpickler that admits only DCP's own metadata classes, and DCP's byte
items load with `weights_only=True` (`load_dcp`, `read_dcp_metadata`).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from megatron_sc2.data.indexed import fsync_dir
from megatron_sc2.errors import CheckpointError

FORMAT_VERSION = 1
LATEST_FILE = "latest_checkpointed_iteration.txt"
COMPLETE_MARKER = "complete"
META_FILE = "meta.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
TOKENIZER_DIR = "tokenizer"
# The tokenizer files worth copying from a Hugging Face directory (never its model weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")

# Fields of ModelConfig that must agree between a checkpoint and the run that loads it: the
# shapes. rope_theta, max_position_embeddings and sliding_window are left out on purpose: the
# 16k stage resumes a 4k checkpoint with the rotary base raised tenfold.
ARCH_FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
               "num_query_groups", "tie_word_embeddings", "use_bias")
TIED_HEAD = "lm_head.weight"
EMBEDDING = "embed_tokens.weight"


@dataclass
class TrainState:
    iteration: int = 0          # completed optimizer steps
    consumed_samples: int = 0   # global samples consumed by those steps


@dataclass
class PendingSave:
    """A checkpoint being written in the background (--async-save)."""

    future: Any  # concurrent.futures.Future from torch.distributed.checkpoint.async_save
    tmp: Path
    iteration: int
    meta: dict[str, Any]
    started: float


def stored_key(key: str, tied: bool, holds_tied_copy: bool) -> Optional[str]:
    """The one tied-embedding rule: the stored key of a model or optimizer entry. A tied
    lm_head is never written (None: the embedding is); a last pipeline stage's own copy of the
    tied embedding (holds_tied_copy) is loaded from the embedding's entries."""
    if not tied or TIED_HEAD not in key:
        return key
    return key.replace(TIED_HEAD, EMBEDDING) if holds_tied_copy else None


def copy_tokenizer(src: str | Path, ckpt_dir: Path) -> str:
    """Copy a tokenizer (a tokenizer.json / .model file or a tokenizer directory) into
    `ckpt_dir`, so the checkpoint converts and evaluates without the original path; returns
    the path to record in meta.json, relative to the checkpoint."""
    src = Path(src)
    out = ckpt_dir / TOKENIZER_DIR
    out.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
        if not names:
            raise CheckpointError(f"tokenizer directory {src} holds none of {', '.join(TOKENIZER_FILES)}")
        for name in names:
            shutil.copyfile(src / name, out / name)
        return TOKENIZER_DIR
    if not src.is_file():
        raise CheckpointError(f"tokenizer not found: {src}")
    shutil.copyfile(src, out / src.name)
    return f"{TOKENIZER_DIR}/{src.name}"


def tokenizer_path(ckpt_dir: str | Path, meta: dict[str, Any]) -> Optional[str]:
    """The tokenizer recorded in a checkpoint's meta.json: its copy inside the checkpoint
    (a relative path), or an absolute path (older checkpoints)."""
    tok = meta.get("tokenizer")
    if not tok:
        return None
    p = Path(tok)
    return str(p if p.is_absolute() else Path(ckpt_dir) / p)


def checkpoint_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / META_FILE).is_file()


def finished_iterations(save_dir: str | Path) -> list[int]:
    """Iterations with a finished checkpoint, ascending."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        m = _ITER_RE.match(child.name)
        if m and child.is_dir() and is_complete(child):
            out.append(int(m.group(1)))
    return sorted(out)


def earlier_hint(ckpt: Path) -> str:
    """For a bad checkpoint directory: '; iter_0000004 is an earlier complete checkpoint: load
    it with --ckpt-step 4' (or that none exists)."""
    ckpt = Path(ckpt)
    m = _ITER_RE.match(ckpt.name)
    if not m:
        return ""
    before = int(m.group(1))
    older = [i for i in finished_iterations(ckpt.parent) if i < before]
    if not older:
        return "; no earlier complete checkpoint exists"
    return (f"; {checkpoint_dir(ckpt.parent, older[-1]).name} is an earlier complete checkpoint: "
            f"load it with --ckpt-step {older[-1]}")


def find_checkpoint(load_dir: str | Path, iteration: Optional[int] = None) -> Path:
    """The finished checkpoint to load: `iteration` if given, else the latest.

    The latest is the newest complete directory. latest_checkpointed_iteration.txt (Megatron's
    tracker, written after the rename) is not consulted: a kill between the rename and the
    tracker's update leaves it one save behind a finished checkpoint.
    `load_dir` may also name an `iter_XXXXXXX` directory itself.
    """
    root = Path(load_dir)
    if _ITER_RE.match(root.name) and root.is_dir():
        if not is_complete(root):
            raise CheckpointError(f"{root} is not a finished checkpoint (no '{COMPLETE_MARKER}' marker)")
        return root
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {root}")
    if iteration is not None:
        path = checkpoint_dir(root, iteration)
        if not is_complete(path):
            done = finished_iterations(root)
            raise CheckpointError(f"no finished checkpoint for iteration {iteration} in {root} "
                                  f"(finished: {', '.join(map(str, done[-5:])) or 'none'})")
        return path
    done = finished_iterations(root)
    if not done:
        raise CheckpointError(f"no finished checkpoint in {root}")
    return checkpoint_dir(root, done[-1])


def has_checkpoint(load_dir: str | Path) -> bool:
    try:
        find_checkpoint(load_dir)
        return True
    except CheckpointError:
        return False


def read_meta(path: str | Path) -> dict[str, Any]:
    try:
        return _read_meta(Path(path))
    except CheckpointError as e:
        raise CheckpointError(f"{e}{earlier_hint(Path(path))}") from None


def _read_meta(path: Path) -> dict[str, Any]:
    p = Path(path) / META_FILE
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: expected a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p}: unsupported checkpoint format version {meta.get('format_version')!r}")
    for key in ("iteration", "consumed_samples"):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise CheckpointError(f"{p}: {key!r} must be a non-negative integer, got {v!r}")
    if not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{p}: 'model_config' must be a JSON object")
    m = _ITER_RE.match(Path(path).name)
    if m and int(m.group(1)) != meta["iteration"]:
        raise CheckpointError(f"{p}: says iteration {meta['iteration']} but lies in {Path(path).name}")
    return meta


# -- reading without executing: RNG state, DCP metadata and byte items -------------------------

def save_rng_state(path: Path) -> None:
    """This process's torch and numpy RNG state as tensors and plain numbers (loadable with
    `weights_only=True`: no pickled objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_kind": str(kind),
             "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
             "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss)}
    torch.save(state, path)


def load_rng_state(path: Path) -> None:
    """Restore what `save_rng_state` wrote; a file holding anything else is refused unexecuted.
    Checkpoints of format 1 written before this (numpy state as a pickled tuple) still load:
    numpy's array reconstruction is admitted, nothing else."""
    safe = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(safe):
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: refused or unreadable RNG state (nothing in it was run) ({_first_line(e)})"
                              f"{earlier_hint(path.parent.parent)}") from None
    try:
        torch_state = state["torch"]
        if "numpy_keys" in state:
            keys = state["numpy_keys"].numpy().astype(np.uint32)
            np_state = (state["numpy_kind"], keys, int(state["numpy_pos"]), int(state["numpy_has_gauss"]),
                        float(state["numpy_gauss"]))
        else:
            np_state = state["numpy"]
        if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8:
            raise TypeError("the torch state is not a uint8 tensor")
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
    except Exception as e:
        raise CheckpointError(f"{path}: not a valid RNG state ({_first_line(e)})"
                              f"{earlier_hint(path.parent.parent)}") from None


_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, torch dtypes/sizes/layouts and plain containers only."""

    def find_class(self, module: str, name: str) -> Any:
        if module == _DCP_METADATA_MODULE:
            import torch.distributed.checkpoint.metadata as md

            obj = getattr(md, name, None)
            if isinstance(obj, type) and obj.__module__ == _DCP_METADATA_MODULE:
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.memory_format):
            return getattr(torch, name)
        elif (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def read_dcp_metadata(ckpt: str | Path):
    """DCP's `.metadata` of a checkpoint directory, unpickled with only its own classes allowed."""
    path = Path(ckpt) / ".metadata"
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a finished DCP checkpoint){earlier_hint(path.parent)}") from None
    except Exception as e:  # a payload, a corrupt pickle, a foreign file
        raise CheckpointError(f"{path}: refused or corrupt DCP metadata ({_first_line(e)})"
                              f"{earlier_hint(path.parent)}") from None
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{path}: not DCP metadata (a {type(md).__name__}){earlier_hint(path.parent)}")
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
    return md


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        md = read_dcp_metadata(self.path)
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor items load with `weights_only=True`."""

    def __init__(self, ckpt: Path, **kwargs: Any):
        super().__init__(**kwargs)
        self._ckpt = Path(ckpt)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"refused or corrupt item {read_item.dest_index.fqn!r} "
                                  f"({_first_line(e)}){earlier_hint(self._ckpt)}") from None
        from torch.distributed.checkpoint._traverse import set_element

        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_dcp(state: dict[str, Any], path: Path, no_dist: bool = False) -> None:
    """`dcp.load` through the safe reader and planner; any failure is one CheckpointError
    naming the checkpoint and the earlier complete one to fall back to."""
    import torch.distributed.checkpoint as dcp

    read_dcp_metadata(path)  # a refused or corrupt .metadata is named before any collective
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(path),
                     no_dist=no_dist)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        inner = _dcp_inner(e)
        if isinstance(inner, CheckpointError):
            raise CheckpointError(f"{path}: {inner}") from None
        raise CheckpointError(f"{path}: corrupt checkpoint ({dcp_error_line(e)}){earlier_hint(path)}") from None


def _dcp_inner(e: BaseException) -> BaseException:
    """DCP wraps each rank's exception in a CheckpointException; the first rank's one."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        exc = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(exc, BaseException):
            return exc
    return e


def dcp_error_line(e: BaseException) -> str:
    return _first_line(_dcp_inner(e))


def write_failure(e: BaseException, where: str | Path, needed: int = 1 << 20) -> str:
    """Why a (DCP) write failed, in words: torch reports a full disk as a zip-writer position
    mismatch, so look at the free space when no OSError says it."""
    inner = _dcp_inner(e)
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if free is not None and free < needed:
        return f"No space left on device: {free:,} bytes free, about {needed:,} needed"
    return dcp_error_line(e)


def _first_line(e: BaseException) -> str:
    """The line of an exception's message that says what is wrong (torch's weights_only
    refusals say it in a middle line: 'Unsupported global: GLOBAL posix.system ...')."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    pick = next((ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln), lines[0])
    return f"{type(e).__name__}: {pick[:300]}"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def temporary_dir(save_dir: str | Path, iteration: int, nonce: str) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}.tmp-{nonce}"


def write_meta(tmp_dir: Path, meta: dict[str, Any]) -> None:
    meta = {"format_version": FORMAT_VERSION, **meta}
    write_json_atomic(tmp_dir / META_FILE, meta)


def finalize(tmp_dir: Path, save_dir: str | Path, iteration: int) -> Path:
    """Mark complete, rename into place and point the tracker at it (one rank calls this,
    after every rank finished writing). Replaces an older checkpoint of the same iteration."""
    final = checkpoint_dir(save_dir, iteration)
    write_text_atomic(tmp_dir / COMPLETE_MARKER, f"{iteration}\n")
    fsync_dir(tmp_dir)
    if final.exists():
        trash = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp_dir, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final)
    fsync_dir(Path(save_dir))
    write_text_atomic(Path(save_dir) / LATEST_FILE, f"{iteration}\n")
    return final


def prune(save_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` finished checkpoints, and stale temporaries."""
    root = Path(save_dir)
    if keep_last > 0:
        for it in finished_iterations(root)[:-keep_last]:
            shutil.rmtree(checkpoint_dir(root, it), ignore_errors=True)
    for child in root.glob("iter_*.tmp-*"):
        # A temporary from a process that no longer runs is a save that died half-way.
        nonce = child.name.rsplit("-", 1)[-1]
        if nonce.isdigit() and _pid_alive(int(nonce)):
            continue
        shutil.rmtree(child, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
