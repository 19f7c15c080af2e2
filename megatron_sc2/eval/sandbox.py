"""Running untrusted programs (model completions with their tests), many at a time.

Each program runs through sandbox_child.py in its own process group and its own mount,
network and PID namespaces (see that file), with CPU-time, memory, process-count and
file-size limits, a fresh temporary working directory, an empty environment and an
unprivileged uid per worker slot. A wall-clock timeout kills the whole group; afterwards any
process still running under the slot's uid is killed too, so nothing outlives its sample.

Isolation needs root (we create namespaces ourselves; no setuid helper is assumed). Where it
is not available the sandbox refuses to run unless `allow_unisolated` is set, which keeps the
limits, the temporary directory and the empty environment but not the namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_sc2.errors import ConfigError

CHILD = Path(__file__).with_name("sandbox_child.py")
ISOLATION_FAILED = 97
UID_BASE = 200_000   # slot uids: UID_BASE + (pid % UID_BLOCKS) * MAX_WORKERS + slot
UID_BLOCKS = 40_000  # so that two evaluators on one machine do not share (or kill) a uid
MAX_WORKERS = 256
PASSED, FAILED, ERROR, TIMEOUT = "passed", "failed", "error", "timeout"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0         # wall clock, whole process group
    cpu_s: int = 10                 # RLIMIT_CPU
    memory_bytes: int = 1 << 30     # RLIMIT_AS
    nproc: int = 32                 # RLIMIT_NPROC (per slot uid)
    fsize_bytes: int = 16 << 20     # RLIMIT_FSIZE

    def validate(self) -> "Limits":
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout must be > 0, got {self.timeout_s}")
        if self.cpu_s < 1 or self.memory_bytes < (64 << 20) or self.nproc < 1:
            raise ConfigError("sandbox limits too small to start Python (cpu >= 1 s, memory >= 64 MiB)")
        return self


@dataclass(frozen=True)
class RunResult:
    status: str            # passed | failed | error | timeout
    returncode: Optional[int]
    error: str             # one line: the exception, signal or timeout; "" when passed
    seconds: float


def _others_can_run(path: Path) -> bool:
    """True when an unprivileged user can execute `path` (every directory above is o+x)."""
    try:
        real = path.resolve()
        if not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def program_python() -> str:
    """The interpreter for sandboxed programs: ours when an unprivileged uid may run it, else
    the system's python3 (the programs need only the standard library)."""
    candidates = [Path(sys.executable)] + [Path(p) for p in (shutil.which("python3"), "/usr/bin/python3") if p]
    for c in candidates:
        if _others_can_run(c):
            return str(c.resolve())
    raise ConfigError("no Python interpreter that an unprivileged user may run was found for the "
                      "sandbox (looked at " + ", ".join(map(str, candidates)) + ")")


class Sandbox:
    """Runs programs under `limits`, up to `workers` at once. Checks once, at construction,
    that isolation works (or that the caller accepted running unisolated)."""

    def __init__(self, limits: Limits = Limits(), workers: int = 1, allow_unisolated: bool = False):
        if not 1 <= workers <= MAX_WORKERS:
            raise ConfigError(f"--workers must be in 1..{MAX_WORKERS}, got {workers}")
        self.limits = limits.validate()
        self.workers = workers
        self.root = os.geteuid() == 0
        self.python = program_python() if self.root else sys.executable
        self.isolate = self.root and self._probe()
        if not self.isolate and not allow_unisolated:
            why = ("it needs root to create namespaces" if not self.root
                   else "creating mount/network/PID namespaces failed")
            raise ConfigError(
                f"the sandbox cannot isolate programs on this machine ({why}); pass "
                f"--allow-unisolated-execution to run untrusted code without isolation")
        self._slots: list[int] = list(range(workers))
        self._uid_base = UID_BASE + (os.getpid() % UID_BLOCKS) * MAX_WORKERS
        self._lock = threading.Lock()

    def _probe(self) -> bool:
        with tempfile.TemporaryDirectory(prefix="msc2-probe-") as d:
            args = self._args(Path(d), "probe.py", None, isolate=True)
            args["probe"] = True
            proc = subprocess.run([sys.executable, "-I", "-S", str(CHILD), json.dumps(args)],
                                  capture_output=True, timeout=30, env={}, start_new_session=True)
            return proc.returncode == 0

    def _args(self, cwd: Path, program: str, uid: Optional[int], isolate: bool) -> dict:
        L = self.limits
        return {"cwd": str(cwd), "program": program, "python": self.python, "uid": uid,
                "cpu_s": L.cpu_s, "memory_bytes": L.memory_bytes, "nproc": L.nproc,
                "fsize_bytes": L.fsize_bytes, "isolate": isolate}

    # -- one program ------------------------------------------------------------------------
    def run(self, source: str) -> RunResult:
        with self._lock:
            slot = self._slots.pop()
        try:
            return self._run_in_slot(source, slot)
        finally:
            with self._lock:
                self._slots.append(slot)

    def uid(self, slot: int) -> Optional[int]:
        """The unprivileged uid (and gid) programs of worker slot `slot` run as (None: not root)."""
        return self._uid_base + slot if self.root else None

    def _run_in_slot(self, source: str, slot: int) -> RunResult:
        uid = self.uid(slot)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="msc2-sandbox-") as d:
            top = Path(d)
            os.chmod(top, 0o711)  # the box's uid may enter, not list
            work = top / "work"
            work.mkdir(mode=0o700)
            (work / "main.py").write_text(source, encoding="utf-8")
            if uid is not None:
                os.chown(work, uid, uid)
                os.chown(work / "main.py", uid, uid)
            log = open(top / "output.txt", "w+b")
            try:
                args = self._args(work, "main.py", uid, self.isolate)
                proc = subprocess.Popen([sys.executable, "-I", "-S", str(CHILD), json.dumps(args)],
                                        cwd=work, env={}, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    rc = proc.wait(timeout=self.limits.timeout_s)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    timed_out = True
                    rc = None
                _kill_group(proc.pid)
                if rc is None:
                    proc.wait()
                if uid is not None:
                    kill_uid(uid)
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - 4000))
                tail = log.read().decode("utf-8", "replace")
            finally:
                log.close()
        seconds = time.perf_counter() - t0
        return classify(rc, timed_out, tail, self.limits, seconds)

    # -- many -------------------------------------------------------------------------------
    def run_many(self, sources: Sequence[str],
                 on_done: Optional[Callable[[int, RunResult], None]] = None) -> list[RunResult]:
        """Run every program (up to `workers` at once); results in input order."""
        results: list[Optional[RunResult]] = [None] * len(sources)

        def one(i: int) -> None:
            results[i] = self.run(sources[i])
            if on_done is not None:
                on_done(i, results[i])

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for f in [pool.submit(one, i) for i in range(len(sources))]:
                f.result()
        return [r for r in results if r is not None]


def classify(rc: Optional[int], timed_out: bool, tail: str, limits: Limits, seconds: float) -> RunResult:
    if timed_out:
        return RunResult(TIMEOUT, None, f"timed out after {limits.timeout_s:g} s (wall clock)", seconds)
    if rc == 0:
        return RunResult(PASSED, 0, "", seconds)
    if rc == ISOLATION_FAILED and "sandbox: cannot isolate" in tail:
        return RunResult(ERROR, rc, _last_line(tail), seconds)
    if rc is not None and rc > 128:
        sig = rc - 128
        if sig in (signal.SIGXCPU, signal.SIGKILL) and seconds < limits.timeout_s:
            name = signal.Signals(sig).name
            return RunResult(TIMEOUT, rc, f"killed by {name} (CPU limit {limits.cpu_s} s)", seconds)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return RunResult(ERROR, rc, f"killed by {name}", seconds)
    line = _last_line(tail)
    status = FAILED if line.startswith("AssertionError") else ERROR
    return RunResult(status, rc, line or f"exit status {rc}", seconds)


def _last_line(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def processes_of(uid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose real uid is `uid`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            continue
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            out.append(int(entry))
    return out


def kill_uid(uid: int, rounds: int = 50) -> None:
    """SIGKILL every process of `uid` until none is left (a fork loop may race a few rounds)."""
    for _ in range(rounds):
        pids = processes_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
