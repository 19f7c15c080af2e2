"""Loads the compiled attention modules (built by kernels/build.py into this package).

Each module is optional: when one is missing the attention entry point uses the PyTorch
reference instead and says so once in the log.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Optional

log = logging.getLogger(__name__)

_cache: dict[str, Optional[ModuleType]] = {}
_errors: dict[str, str] = {}
_warned: set[str] = set()


def _load(name: str) -> Optional[ModuleType]:
    if name not in _cache:
        try:
            _cache[name] = importlib.import_module(f"megatron_sc2.ops.{name}")
        except ImportError as exc:  # not built (or built for another Python)
            _cache[name] = None
            _errors[name] = str(exc)
    return _cache[name]


def cpu_module() -> Optional[ModuleType]:
    """The C++ kernel module `_attn_cpu`, or None when it was not built."""
    return _load("_attn_cpu")


def cuda_module() -> Optional[ModuleType]:
    """The CUDA kernel module `_attn_cuda`, or None when it was not built."""
    return _load("_attn_cuda")


def emu_module() -> Optional[ModuleType]:
    """`_attn_cuda_emu`: the CUDA kernels compiled as C++ and run by the CPU emulator
    (kernels/cuda/emu/), for tests; same functions as `_attn_cuda` on CPU pointers, plus the
    emulator's self-tests. None when it was not built."""
    return _load("_attn_cuda_emu")


CUDA_KERNELS = {"mma": 0, "simt": 1}
# Tensor cores by default: both families pass the same tests under the CPU emulator (kernels/README.md),
# and neither has run on a GPU yet; the SIMT family stays as the plainer second opinion.
DEFAULT_CUDA_KERNEL = "mma"


def cuda_kernel_code() -> int:
    """Which CUDA kernel family runs: MEGATRON_SC2_CUDA_KERNEL=mma (tensor cores) or simt."""
    name = os.environ.get("MEGATRON_SC2_CUDA_KERNEL", "").strip().lower() or DEFAULT_CUDA_KERNEL
    if name not in CUDA_KERNELS:
        raise ValueError(f"MEGATRON_SC2_CUDA_KERNEL={name!r}: expected one of {sorted(CUDA_KERNELS)}")
    return CUDA_KERNELS[name]


def load_error(name: str) -> str:
    return _errors.get(name, "")


def warn_once(key: str, message: str) -> None:
    """Logs a fallback reason once per process (per key)."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
