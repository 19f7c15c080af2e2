"""What a clean run is asked to do (`CleanConfig`) and where its shards' work files live."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from megatron_sc2.errors import ConfigError
from megatron_sc2.data.prep.clean import near_dedup as near

WORK = ".clean-work"


@dataclass
class CleanConfig:
    inputs: list[str]
    output: str
    text_key: Optional[str] = None
    skip_malformed: bool = False
    exact_dedup: bool = False
    near_dedup: bool = False
    near_verify: float = 0.7
    pii: bool = False
    decontaminate: bool = False
    benchmark_files: list[str] = field(default_factory=list)
    licenses: Optional[tuple[str, ...]] = None
    languages: Optional[tuple[str, ...]] = None
    path_filters: bool = False
    num_perm: int = 250
    bands: int = near.BANDS
    rows: int = near.ROWS
    seed: int = 42

    def fingerprint(self) -> str:
        """The settings and inputs (paths, sizes, modification times) a finished shard was made
        from: a shard is reused only when they are the same."""
        from megatron_sc2.data.prep.sources import expand_inputs

        d = asdict(self)
        d.pop("output")
        d["inputs"] = []
        for _, path in expand_inputs(self.inputs):
            st = path.stat()
            d["inputs"].append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        d["benchmark_files"] = [str(Path(p).resolve()) for p in self.benchmark_files]
        return hashlib.blake2b(json.dumps(d, sort_keys=True, default=list).encode(), digest_size=12).hexdigest()

    def check(self) -> None:
        if self.bands * self.rows > self.num_perm:
            raise ConfigError(f"--bands x --rows ({self.bands} x {self.rows}) exceed --num-perm {self.num_perm}")
        if not 0 <= self.near_verify <= 1:
            raise ConfigError(f"--near-verify must be within [0, 1], got {self.near_verify}")
        if not self.inputs:
            raise ConfigError("nothing to clean: give --input")


def work_dir(cfg: CleanConfig) -> Path:
    return Path(cfg.output) / WORK


def shard_dir(cfg: CleanConfig, i: int, n: int) -> Path:
    return work_dir(cfg) / f"shard-{i:05d}-of-{n:05d}"
