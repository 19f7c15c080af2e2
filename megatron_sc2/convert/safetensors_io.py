"""Streaming safetensors files: write a shard tensor by tensor, read one tensor at a time.

The `safetensors` library writes a whole dict at once (the shard must sit in memory) and reads
through mmap (touched pages count towards RSS until the file is closed). The format is small
(8-byte little-endian header length, a JSON header, then the raw bytes) so we write the header
first from the known shapes and then stream each tensor's bytes with plain file I/O; the
`safetensors` library itself is the independent reader that validates what we wrote.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from megatron_sc2.errors import CheckpointError

DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
ST_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_TO_ST.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def nbytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (contiguous copy if needed), writable, without
    a copy. Made through ctypes rather than `.numpy()`, which would pin the storage's size and so
    stop its memory from being released early (see from_hf); the view keeps the tensor alive."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(bytearray())
    raw = (ctypes.c_char * t.nbytes).from_address(t.data_ptr())
    raw.owner = t  # type: ignore[attr-defined]
    return memoryview(raw).cast("B")


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header; names the file when it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"missing shard {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    base = 8 + n
    out: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = ST_TO_DTYPE.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        if end - begin != nbytes_of(shape, dtype) or base + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} is truncated or inconsistent with its shape")
        out[name] = TensorEntry(name, dtype, shape, base + begin, end - begin)
    return out


def read_tensor(f: BinaryIO, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor into fresh memory (no mmap), exactly `nbytes` allocated."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    f.seek(entry.start)
    view = tensor_bytes(buf)
    got = 0
    while got < entry.nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{getattr(f, 'name', '?')}: unexpected end of file in tensor {entry.name!r}")
        got += n
    return buf.view(entry.dtype).reshape(entry.shape) if entry.nbytes else torch.empty(entry.shape, dtype=entry.dtype)


class ShardWriter:
    """Writes one safetensors file whose tensor list (names, shapes, dtypes) is known up front;
    tensors are then appended in that order, one at a time. The file is written under a
    temporary name and renamed by `close()` only when every tensor arrived."""

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: Optional[dict[str, str]] = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        self.specs = specs
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, shape, dtype in specs:
            n = nbytes_of(shape, dtype)
            header[name] = {"dtype": DTYPE_TO_ST[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the library does
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        want_name, shape, dtype = self.specs[self.next]
        if name != want_name or tuple(t.shape) != shape or t.dtype != dtype:
            raise CheckpointError(
                f"internal: expected {want_name} {shape} {dtype} next in {self.path.name}, "
                f"got {name} {tuple(t.shape)} {t.dtype}")
        self.f.write(tensor_bytes(t))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.specs):
            raise CheckpointError(f"internal: {self.path.name} closed after {self.next} of {len(self.specs)} tensors")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)
