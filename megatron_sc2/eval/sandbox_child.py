"""The launcher that puts one untrusted program in its box (run as a script by sandbox.py).

Standard library only, run with `python -I -S`. As root it

1. unshares mount, network, PID, IPC and UTS namespaces (the new network namespace has only
   a downed loopback, so no connection leaves it, not even to 127.0.0.1);
2. forks the namespace's init, which makes every mount read-only except the working
   directory, mounts a /proc that shows only the box's processes, and forks the program;
3. the program gets RLIMIT_CPU/AS/NPROC/FSIZE/CORE, an unprivileged uid of its own (so the
   process-count limit bites and nothing of the caller's is readable), an empty environment,
   and is exec'd.

When init's program exits, init exits with its status and the kernel kills whatever else is
left in the PID namespace; if this launcher is killed (the wall-clock timeout kills its
process group), init dies with it (PR_SET_PDEATHSIG) and takes the namespace down.
Without isolation (`isolate` false) only steps 3 and the limits apply.

argv[1] is a JSON object: cwd, program, python, uid, cpu_s, memory_bytes, nproc, fsize_bytes,
isolate. Exit status: the program's, 128 + signal if it was killed, 97 if isolation failed.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
PR_SET_PDEATHSIG = 1
ISOLATION_FAILED = 97
_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
          "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src, target, fstype, flags) -> None:
    enc = lambda s: None if s is None else s.encode()
    _check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), None),
           f"mount {target}")


def _unescape(path: str) -> str:
    return path.encode().decode("unicode_escape") if "\\" in path else path


def _mount_points() -> list[tuple[str, int]]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            flags = 0
            for opt in fields[5].split(","):
                flags |= _FLAGS.get(opt, 0)
            out.append((_unescape(fields[4]), flags))
    return out


def _read_only_except(cwd: str) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount(cwd, cwd, None, MS_BIND)
    for point, flags in _mount_points():
        if point == cwd:
            continue
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            # A mount that refuses (some pseudo filesystems) must not stay writable unnoticed:
            # only those nobody could write to anyway are tolerated.
            if not point.startswith(("/proc", "/sys")):
                raise
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _exec_program(a: dict) -> None:
    for res, value in ((resource.RLIMIT_CPU, a["cpu_s"]), (resource.RLIMIT_AS, a["memory_bytes"]),
                       (resource.RLIMIT_FSIZE, a["fsize_bytes"]), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_NPROC, a["nproc"])):
        hard = value + 1 if res == resource.RLIMIT_CPU else value
        resource.setrlimit(res, (value, hard))
    os.chdir(a["cwd"])
    if a["uid"] is not None:
        os.setgroups([])
        os.setgid(a["uid"])
        os.setuid(a["uid"])
    if a["isolate"]:
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL), "prctl")
    os.execve(a["python"], [a["python"], "-I", "-B", a["program"]], {})


def _wait_status(pid: int) -> int:
    """Wait for pid (reaping any other child meanwhile) and turn its status into an exit code."""
    while True:
        got, status = os.waitpid(-1, 0)
        if got == pid:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.WEXITSTATUS(status)


def main() -> int:
    a = json.loads(sys.argv[1])
    if not a["isolate"]:
        pid = os.fork()
        if pid == 0:
            _exec_program(a)
        return _wait_status(pid)
    try:
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS),
               "unshare")
    except OSError as e:
        print(f"sandbox: cannot isolate: {e}", file=sys.stderr)
        return ISOLATION_FAILED
    init = os.fork()
    if init == 0:  # pid 1 of the new namespace
        try:
            _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL), "prctl")
            _read_only_except(a["cwd"])
        except OSError as e:
            print(f"sandbox: cannot isolate: {e}", file=sys.stderr)
            os._exit(ISOLATION_FAILED)
        if a.get("probe"):
            os._exit(0)
        prog = os.fork()
        if prog == 0:
            try:
                _exec_program(a)
            finally:
                os._exit(ISOLATION_FAILED)
        os._exit(_wait_status(prog))
    return _wait_status(init)


if __name__ == "__main__":
    sys.exit(main())
