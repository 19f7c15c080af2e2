"""Build of the attention kernels: pybind11 modules compiled by calling the compilers directly.

Why not torch's cpp_extension: a CPU-only torch cannot build a CUDAExtension, and setup.py must
not import torch. The modules take raw pointers (as integers), sizes and a stream handle, so they
need no torch headers:

- `megatron_sc2.ops._attn_cpu` (always): the C++ kernel compiled three times, baseline x86-64,
  AVX2+FMA and AVX-512 (F/BW/VL/DQ), picked at run time from what the CPU reports, so a build is
  safe to run on any x86-64 CI machine.
- `megatron_sc2.ops._attn_cuda` (when a CUDA toolkit is found): sm_80 and sm_90 code, cudart
  linked statically; it imports without a GPU and raises when called without one.
- `megatron_sc2.ops._attn_cuda_emu` (always): the same CUDA kernel source compiled by the host
  C++ compiler as C++ (`-DSC2_CUDA_EMULATION`) against the CPU emulator in `cuda/emu/`, so the
  tests run the CUDA kernels without a GPU or nvcc. Pointers are CPU memory.

Switches (environment):
  MEGATRON_SC2_CUDA=0|1     0: never build CUDA; 1: build it or fail (default: when found)
  MEGATRON_SC2_CPU=0        do not build the C++ module (forces the PyTorch fallback)
  MEGATRON_SC2_CUDA_EMU=0   do not build the emulated CUDA module (its tests then skip)
  MEGATRON_SC2_CUDA_ARCHS   e.g. "80;90" (default), compute capabilities to compile for
  CUDA_HOME / CUDA_PATH     toolkit root (else /usr/local/cuda, then the newest /usr/local/cuda-*)
  CXX                       host C++ compiler (default c++)

Builds are incremental: each module remembers a hash of its sources and commands and is not
rebuilt while they are unchanged. Outputs are linked under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from setuptools import Extension
from setuptools.command.build_ext import build_ext

KERNELS = Path(__file__).resolve().parent
CPU_DIR = KERNELS / "cpu"
CUDA_DIR = KERNELS / "cuda"
CPU_MODULE = "megatron_sc2.ops._attn_cpu"
CUDA_MODULE = "megatron_sc2.ops._attn_cuda"
EMU_DIR = CUDA_DIR / "emu"
EMU_MODULE = "megatron_sc2.ops._attn_cuda_emu"


class KernelBuildError(RuntimeError):
    """A compiler or linker command failed; the message holds the command and its output."""


def find_cuda_home() -> Optional[Path]:
    """The CUDA toolkit root: the directory whose include/cuda_runtime.h and bin/nvcc exist.

    The `nvcc` on PATH may be a wrapper script, so the toolkit is located by its headers."""
    candidates: list[Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]))
    candidates.append(Path("/usr/local/cuda"))

    def version_key(p: Path) -> tuple:
        tail = p.name.split("-", 1)[-1]
        return tuple(int(x) if x.isdigit() else 0 for x in tail.split("."))

    candidates += sorted(Path("/usr/local").glob("cuda-*"), key=version_key, reverse=True)
    for root in candidates:
        if (root / "include" / "cuda_runtime.h").is_file() and (root / "bin" / "nvcc").is_file():
            return root.resolve()
    return None


def _switch(name: str) -> Optional[bool]:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise KernelBuildError(f"{name}={value!r}: expected 0 or 1")


def cuda_archs() -> list[str]:
    raw = os.environ.get("MEGATRON_SC2_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    for a in archs:
        if not a.isdigit():
            raise KernelBuildError(f"MEGATRON_SC2_CUDA_ARCHS: {a!r} is not a compute capability")
    return archs


def kernel_extensions() -> list[Extension]:
    """The modules setup.py should build, according to the switches above."""
    exts = []
    if _switch("MEGATRON_SC2_CPU") is not False:
        exts.append(Extension(CPU_MODULE, sources=[str(p.relative_to(KERNELS.parent))
                                                   for p in sorted(CPU_DIR.glob("*.cpp"))]))
    want_cuda = _switch("MEGATRON_SC2_CUDA")
    if want_cuda is True and find_cuda_home() is None:
        raise KernelBuildError("MEGATRON_SC2_CUDA=1 but no CUDA toolkit (include/cuda_runtime.h) "
                               "was found; set CUDA_HOME")
    if want_cuda is not False and find_cuda_home() is not None:
        exts.append(Extension(CUDA_MODULE, sources=[str(p.relative_to(KERNELS.parent)) for p in
                                                    sorted(CUDA_DIR.glob("*.c[up]*"))]))
    if _switch("MEGATRON_SC2_CUDA_EMU") is not False:
        exts.append(Extension(EMU_MODULE, sources=[str(p.relative_to(KERNELS.parent)) for p in
                                                   _emu_inputs()]))
    return exts


@dataclass
class Plan:
    """How to build one module: compile commands (source -> object), then one link command."""

    output: Path
    stamp: Path  # where the fingerprint of the last successful build is kept (not in output's dir)
    compiles: list[list[str]] = field(default_factory=list)
    link: list[str] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for path in sorted(self.inputs):
            h.update(str(path).encode())
            h.update(path.read_bytes())
        h.update(json.dumps([self.compiles, self.link]).encode())
        return h.hexdigest()


def _stamp(output: Path, tmpdir: Path) -> Path:
    tag = hashlib.sha256(str(output).encode()).hexdigest()[:12]
    return tmpdir / f"{output.name}.{tag}.buildhash"


def _python_includes() -> list[str]:
    import pybind11  # build requirement (pyproject.toml)

    return [f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}"]


def _cxx() -> list[str]:
    return shlex.split(os.environ.get("CXX", "c++"))


def cpu_plan(output: Path, tmpdir: Path) -> Plan:
    cxx = _cxx()
    common = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fvisibility=hidden", "-Wall",
              "-Wno-psabi", f"-I{CPU_DIR}"]
    plan = Plan(output=output, stamp=_stamp(output, tmpdir),
                inputs=sorted(CPU_DIR.glob("*.cpp")) + sorted(CPU_DIR.glob("*.h")))
    variants = [("sc2_cpu_baseline", [])]
    if platform.machine() in ("x86_64", "AMD64"):
        variants.append(("sc2_cpu_avx2", ["-mavx2", "-mfma", "-mf16c"]))
        variants.append(("sc2_cpu_avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl",
                                            "-mavx512dq", "-mfma"]))
    objects = []
    for ns, flags in variants:
        obj = tmpdir / f"attn_cpu_kernel.{ns}.o"
        plan.compiles.append(cxx + common + flags + [f"-DSC2_NS={ns}", "-c",
                                                     str(CPU_DIR / "attn_cpu_kernel.cpp"), "-o", str(obj)])
        objects.append(obj)
    obj = tmpdir / "attn_cpu_bindings.o"
    plan.compiles.append(cxx + common + _python_includes() +
                         ["-c", str(CPU_DIR / "attn_cpu_bindings.cpp"), "-o", str(obj)])
    objects.append(obj)
    plan.link = cxx + ["-shared", "-fopenmp"] + [str(o) for o in objects] + ["-o"]
    return plan


def cuda_plan(output: Path, tmpdir: Path, cuda_home: Path) -> Plan:
    cxx = _cxx()
    nvcc = str(cuda_home / "bin" / "nvcc")
    gencode = []
    archs = cuda_archs()
    for a in archs:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer
    plan = Plan(output=output, stamp=_stamp(output, tmpdir),
                inputs=sorted(CUDA_DIR.glob("*.c[up]*")) + sorted(CUDA_DIR.glob("*.h")))
    kobj = tmpdir / "attn_cuda_kernel.o"
    plan.compiles.append([nvcc, "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                          "-Xcompiler", "-fPIC,-fvisibility=hidden", f"-I{CUDA_DIR}", *gencode,
                          "-c", str(CUDA_DIR / "attn_cuda_kernel.cu"), "-o", str(kobj)])
    bobj = tmpdir / "attn_cuda_bindings.o"
    plan.compiles.append(cxx + ["-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall",
                                f"-I{CUDA_DIR}", f"-I{cuda_home / 'include'}"] + _python_includes() +
                         ["-c", str(CUDA_DIR / "attn_cuda_bindings.cpp"), "-o", str(bobj)])
    libdir = cuda_home / "lib64"
    if not libdir.is_dir():
        libdir = cuda_home / "lib"
    plan.link = cxx + ["-shared", str(kobj), str(bobj), f"-L{libdir}", "-lcudart_static", "-ldl",
                       "-lpthread", "-lrt", "-o"]
    return plan


def _emu_inputs() -> list[Path]:
    return sorted(set(CUDA_DIR.glob("*.c[up]*")) | set(CUDA_DIR.glob("*.h")) |
                  set(EMU_DIR.glob("*.c[up]*")) | set(EMU_DIR.glob("*.h")))


def emu_plan(output: Path, tmpdir: Path) -> Plan:
    """The CUDA kernels as C++ on the CPU emulator: no CUDA headers, no nvcc. -O2 keeps the
    compile short; the fibers' context switch is hand-written for x86-64 (ucontext elsewhere)."""
    cxx = _cxx()
    common = ["-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas",
              "-DSC2_CUDA_EMULATION", f"-I{CUDA_DIR}"]
    plan = Plan(output=output, stamp=_stamp(output, tmpdir), inputs=_emu_inputs())
    sources = [("attn_cuda_kernel", CUDA_DIR / "attn_cuda_kernel.cu", ["-x", "c++"]),
               ("emu_selftest", EMU_DIR / "emu_selftest.cu", ["-x", "c++"]),
               ("cuda_emu_runtime", EMU_DIR / "cuda_emu_runtime.cpp", []),
               ("attn_cuda_bindings", CUDA_DIR / "attn_cuda_bindings.cpp",
                ["-DSC2_CUDA_MODULE_NAME=_attn_cuda_emu"] + _python_includes())]
    objects = []
    for name, src, extra in sources:
        obj = tmpdir / f"{name}.emu.o"
        plan.compiles.append(cxx + common + extra + ["-c", str(src), "-o", str(obj)])
        objects.append(obj)
    plan.link = cxx + ["-shared"] + [str(o) for o in objects] + ["-o"]
    return plan


def _run_all(commands: list[list[str]], jobs: int) -> None:
    """Runs commands, up to `jobs` at a time; raises with the output of the first failure."""
    pending = list(commands)
    running: list[tuple[list[str], subprocess.Popen]] = []
    failure = None
    while pending or running:
        while pending and len(running) < jobs and failure is None:
            cmd = pending.pop(0)
            print(" ".join(shlex.quote(c) for c in cmd), flush=True)
            running.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True)))
        cmd, proc = running.pop(0)
        out, _ = proc.communicate()
        if out.strip():
            print(out, end="" if out.endswith("\n") else "\n", flush=True)
        if proc.returncode != 0 and failure is None:
            failure = KernelBuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
        if failure is not None and not running:
            raise failure


def build_plans(plans: list[Plan], jobs: Optional[int] = None, force: bool = False) -> list[Path]:
    """Builds the stale plans (all compiles in parallel, then links); returns what was rebuilt."""
    stale = []
    for plan in plans:
        fp = plan.fingerprint()
        if (not force and plan.output.is_file() and plan.stamp.is_file()
                and plan.stamp.read_text().strip() == fp):
            continue
        stale.append((plan, plan.stamp, fp))
    if not stale:
        return []
    compiles = [c for plan, _, _ in stale for c in plan.compiles]
    _run_all(compiles, jobs or max(1, min(len(compiles), os.cpu_count() or 1)))
    for plan, stamp, fp in stale:
        plan.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = plan.output.with_name(plan.output.name + f".tmp{os.getpid()}")
        _run_all([plan.link + [str(tmp)]], 1)
        os.replace(tmp, plan.output)
        stamp.write_text(fp + "\n")
    return [plan.output for plan, _, _ in stale]


def drop_stale(plans: list[Plan]) -> None:
    """Removes what earlier builds of these (now failed) modules left: the output, its in-place
    copy in the source tree (`build_ext --inplace`) and the fingerprint. A module that is missing
    makes its tests fail loudly; a stale one would quietly test old kernel code."""
    for plan in plans:
        inplace = KERNELS.parent / "megatron_sc2" / "ops" / plan.output.name
        for path in (plan.output, inplace, plan.stamp):
            if path.exists():
                path.unlink()
                print(f"removed stale {path}", file=sys.stderr)


class BuildKernels(build_ext):
    """build_ext that compiles our kernels itself (see the module docstring)."""

    def build_extensions(self) -> None:
        tmpdir = Path(self.build_temp).resolve() / "megatron_sc2_kernels"
        tmpdir.mkdir(parents=True, exist_ok=True)
        plans: list[Plan] = []
        optional_cuda = _switch("MEGATRON_SC2_CUDA") is not True
        for ext in self.extensions:
            output = Path(self.get_ext_fullpath(ext.name)).resolve()
            if ext.name == CPU_MODULE:
                plans.append(cpu_plan(output, tmpdir))
            elif ext.name == CUDA_MODULE:
                cuda_home = find_cuda_home()
                if cuda_home is None:
                    raise KernelBuildError("no CUDA toolkit found (include/cuda_runtime.h)")
                plans.append(cuda_plan(output, tmpdir, cuda_home))
            elif ext.name == EMU_MODULE:
                plans.append(emu_plan(output, tmpdir))
            else:
                raise KernelBuildError(f"unknown extension {ext.name}")
        emu_plans = [p for p in plans if "_attn_cuda_emu" in p.output.name]
        cpu_plans = [p for p in plans if "_attn_cpu" in p.output.name]
        cuda_plans = [p for p in plans if p not in cpu_plans and p not in emu_plans]
        main_plans = cpu_plans + cuda_plans
        try:
            build_plans(main_plans, force=self.force)
        except KernelBuildError:
            if not (cuda_plans and optional_cuda):
                raise
            # The CUDA module is an optional accelerator: build the rest, say loudly what failed.
            print("WARNING: building the CUDA attention module failed (set MEGATRON_SC2_CUDA=0 to "
                  "skip it, =1 to make this an error); building the CPU module only",
                  file=sys.stderr)
            self.extensions = [e for e in self.extensions if e.name != CUDA_MODULE]
            drop_stale(cuda_plans)
            build_plans(cpu_plans, force=self.force)
        try:
            build_plans(emu_plans, force=self.force)
        except KernelBuildError:
            # A test vehicle, not part of the product: its tests fail loudly without it
            # (tests/test_attention_cuda_emu.py), the package still builds.
            print("WARNING: building the emulated CUDA module _attn_cuda_emu failed (set "
                  "MEGATRON_SC2_CUDA_EMU=0 to skip it)", file=sys.stderr)
            self.extensions = [e for e in self.extensions if e.name != EMU_MODULE]
            drop_stale(emu_plans)
