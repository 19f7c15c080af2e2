"""The Bloom filter file of a portrait: a JSON header page, then the bit array, memory-mapped
by every reader (the server and each query share one copy in the page cache).

Hashing: each 50-character window's UTF-8 bytes -> BLAKE2b-128 -> two 64-bit halves h1, h2;
bit i of k is (h1 + i * h2) mod m (Kirsch & Mitzenmacher's double hashing). The bit positions
depend only on the window and on (m, k), never on which shard inserted it, so shards built with
the same sizing merge by OR into exactly the filter one build makes.

Sizing for n elements at error rate p: m = ceil(-n ln p / ln(2)^2) rounded up to 64 bits,
k = round(m / n * ln 2); at p = 0.001 that is about 14.4 bits per element and 10 hashes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from megatron_sc2.errors import ConfigError, DataError

MAGIC = b"SC2BLOOM"
HEADER_BYTES = 4096
VERSION = 1
HASH = "blake2b128-double"
NORMALIZATION = "dataportraits-v1"


@dataclass
class BloomParams:
    """Everything that fixes the bit positions (two filters merge only if these agree)."""

    num_bits: int
    num_hashes: int
    capacity: int
    error_rate: float
    window: int = 50
    hash: str = HASH
    normalization: str = NORMALIZATION
    version: int = VERSION

    @staticmethod
    def for_capacity(capacity: int, error_rate: float, window: int = 50) -> "BloomParams":
        if not 0 < error_rate < 1:
            raise ConfigError(f"--error-rate must be between 0 and 1, got {error_rate}")
        if capacity < 1:
            capacity = 1
        m = math.ceil(-capacity * math.log(error_rate) / math.log(2) ** 2)
        m = max(64, (m + 63) // 64 * 64)
        k = max(1, round(m / capacity * math.log(2)))
        return BloomParams(m, k, capacity, error_rate, window)

    def expected_error_rate(self, n: int) -> float:
        """The false-positive rate after n insertions."""
        return (1 - math.exp(-self.num_hashes * n / self.num_bits)) ** self.num_hashes


def window_digests(windows: Iterable[str]) -> np.ndarray:
    """(n, 2) uint64: the two hash halves of each window."""
    blake = hashlib.blake2b
    data = b"".join(blake(w.encode("utf-8", "surrogatepass"), digest_size=16).digest() for w in windows)
    return np.frombuffer(data, dtype="<u8").reshape(-1, 2)


def bit_positions(digests: np.ndarray, params: BloomParams) -> np.ndarray:
    """(n, k) uint64 bit positions of each window (wrapping 64-bit arithmetic, then mod m)."""
    h1, h2 = digests[:, :1], digests[:, 1:]
    i = np.arange(params.num_hashes, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        return (h1 + i * h2) % np.uint64(params.num_bits)


class BitBuilder:
    """The bits of one build in memory: one byte per bit while inserting (fastest) up to
    `BOOL_LIMIT` bits, packed above it (8x less memory, about 2.5x slower inserts)."""

    BOOL_LIMIT = 1 << 30

    def __init__(self, params: BloomParams):
        self.params = params
        self.packed_mode = params.num_bits > self.BOOL_LIMIT
        self.bits = np.zeros(params.num_bits // 8 if self.packed_mode else params.num_bits,
                             dtype=np.uint8 if self.packed_mode else bool)
        self.inserted = 0

    def add_digests(self, digests: np.ndarray) -> None:
        if not len(digests):
            return
        pos = bit_positions(digests, self.params).ravel()
        if self.packed_mode:
            np.bitwise_or.at(self.bits, (pos >> np.uint64(3)).astype(np.int64),
                             np.left_shift(np.uint8(1), (pos & np.uint64(7)).astype(np.uint8)))
        else:
            self.bits[pos] = True
        self.inserted += len(digests)

    def packed(self) -> np.ndarray:
        return self.bits if self.packed_mode else np.packbits(self.bits, bitorder="little")


def _header_bytes(params: BloomParams, meta: dict[str, Any]) -> bytes:
    body = json.dumps({"params": asdict(params), "meta": meta}, sort_keys=True).encode()
    head = MAGIC + len(body).to_bytes(4, "little") + body
    if len(head) > HEADER_BYTES:
        raise ConfigError(f"portrait header too large ({len(head)} bytes); list fewer datasets")
    return head + b" " * (HEADER_BYTES - len(head))


def write_filter(path: str | os.PathLike, params: BloomParams, packed: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write under a temporary name, rename when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if packed.nbytes * 8 != params.num_bits:
        raise ValueError("bit array does not match its parameters")
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_header_bytes(params, meta))
            f.write(np.ascontiguousarray(packed, dtype=np.uint8).tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_header(path: str | os.PathLike) -> tuple[BloomParams, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: portrait filter not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < 12 or head[:8] != MAGIC:
        raise DataError(f"{path}: not a portrait filter (wrong magic)")
    n = int.from_bytes(head[8:12], "little")
    try:
        doc = json.loads(head[12:12 + n])
        params = BloomParams(**doc["params"])
        meta = doc.get("meta", {})
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}: corrupt or truncated portrait header") from None
    if params.version != VERSION or params.hash != HASH or params.normalization != NORMALIZATION:
        raise DataError(f"{path}: portrait made with other parameters (version {params.version}, hash "
                        f"{params.hash}, normalization {params.normalization}); this build reads version "
                        f"{VERSION}, {HASH}, {NORMALIZATION}: rebuild it")
    if params.window != 50 or params.num_bits <= 0 or params.num_bits % 64 or params.num_hashes < 1:
        raise DataError(f"{path}: portrait parameters not supported (window {params.window}, "
                        f"{params.num_bits} bits, {params.num_hashes} hashes)")
    expected = HEADER_BYTES + params.num_bits // 8
    if size != expected:
        raise DataError(f"{path}: truncated or corrupt portrait filter ({size} bytes, its header implies {expected})")
    return params, meta


@dataclass
class BloomFilter:
    """A read-only, memory-mapped filter."""

    path: Path
    params: BloomParams
    meta: dict[str, Any] = field(default_factory=dict)
    bits: np.ndarray = field(default=None, repr=False)

    @staticmethod
    def open(path: str | os.PathLike) -> "BloomFilter":
        params, meta = read_header(path)
        bits = np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(params.num_bits // 8,))
        return BloomFilter(Path(path), params, meta, bits)

    def contains_digests(self, digests: np.ndarray) -> np.ndarray:
        """bool per window: all k bits set."""
        if not len(digests):
            return np.zeros(0, dtype=bool)
        pos = bit_positions(digests, self.params)
        got = (self.bits[(pos >> np.uint64(3)).astype(np.int64)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
        return got.all(axis=1)

    def contains(self, windows: Sequence[str]) -> np.ndarray:
        return self.contains_digests(window_digests(windows))

    def fill_ratio(self) -> float:
        ones = 0
        step = 1 << 24
        table = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)
        for a in range(0, len(self.bits), step):
            ones += int(table[np.asarray(self.bits[a:a + step])].sum())
        return ones / self.params.num_bits


def merge_filters(paths: Sequence[Path], out: Path, meta: dict[str, Any]) -> Path:
    """OR shard filters of identical parameters into `out`."""
    if not paths:
        raise DataError("no portrait shards to merge")
    first, _ = read_header(paths[0])
    acc = np.zeros(first.num_bits // 8, dtype=np.uint8)
    for p in paths:
        params, _ = read_header(p)
        if params != first:
            raise DataError(f"{p}: portrait shard built with other parameters than {paths[0]} "
                            f"({params.num_bits} bits / {params.num_hashes} hashes / capacity {params.capacity} "
                            f"vs {first.num_bits} / {first.num_hashes} / {first.capacity})")
        acc |= np.fromfile(p, dtype=np.uint8, offset=HEADER_BYTES)
    return write_filter(out, first, acc, meta)
