"""Checkpoints: torch.distributed.checkpoint directories that load under any layout.

Layout of a save directory (see the format notes in the README):

    SAVE/iter_0000100/            DCP files (.metadata, *.distcp) for {"model": ..., "optimizer": ...}
    SAVE/iter_0000100/meta.json   iteration, consumed samples, model and train config, tokenizer
    SAVE/iter_0000100/rng/        per-rank RNG state
    SAVE/iter_0000100/complete    written last; a directory without it is never loaded
    SAVE/latest_checkpointed_iteration.txt   Megatron's name, replaced atomically

A checkpoint is written under `iter_XXXXXXX.tmp-<nonce>` and renamed once every rank has
finished, so a kill at any moment leaves the previous checkpoint as the latest loadable one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from megatron_sc2.errors import CheckpointError

FORMAT_VERSION = 1
LATEST_FILE = "latest_checkpointed_iteration.txt"
COMPLETE_MARKER = "complete"
META_FILE = "meta.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


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


def find_checkpoint(load_dir: str | Path, iteration: Optional[int] = None) -> Path:
    """The finished checkpoint to load: `iteration` if given, else the latest.

    The latest is the one named in latest_checkpointed_iteration.txt when that checkpoint is
    complete, otherwise the newest complete directory (the tracker may lag a crash by one save).
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
            raise CheckpointError(f"no finished checkpoint for iteration {iteration} in {root}")
        return path
    tracker = root / LATEST_FILE
    if tracker.is_file():
        try:
            it = int(tracker.read_text().strip())
            if is_complete(checkpoint_dir(root, it)):
                return checkpoint_dir(root, it)
        except ValueError:
            pass
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
    p = Path(path) / META_FILE
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p}: unsupported checkpoint format version {meta.get('format_version')!r}")
    return meta


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finalize(tmp_dir: Path, save_dir: str | Path, iteration: int) -> Path:
    """Mark complete, rename into place and point the tracker at it (one rank calls this,
    after every rank finished writing). Replaces an older checkpoint of the same iteration."""
    final = checkpoint_dir(save_dir, iteration)
    write_text_atomic(tmp_dir / COMPLETE_MARKER, f"{iteration}\n")
    _fsync_dir(tmp_dir)
    if final.exists():
        trash = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp_dir, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final)
    _fsync_dir(Path(save_dir))
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
