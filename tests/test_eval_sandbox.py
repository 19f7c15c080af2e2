"""The sandbox against hostile programs: each must fail inside the limits, leave nothing
running, touch nothing outside its directory, reach no listener, see none of our environment,
and the next program must still run."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from megatron_sc2.errors import ConfigError
from megatron_sc2.eval.sandbox import PASSED, TIMEOUT, Limits, Sandbox, processes_of


@pytest.fixture(scope="module")
def box():
    if os.geteuid() != 0:
        pytest.skip("isolation needs root; the refusal is tested below")
    return Sandbox(Limits(timeout_s=4, cpu_s=2, memory_bytes=512 << 20, nproc=16), workers=2)


def test_hostile_programs_fail_inside_the_limits_and_nothing_survives(box, tmp_path, monkeypatch):
    monkeypatch.setenv("MSC2_SECRET", "s3cret")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    # A directory anyone may write to (like /tmp itself): only the read-only mounts stop it.
    open_dir = tempfile.mkdtemp(prefix="msc2-open-", dir="/tmp")
    os.chmod(open_dir, 0o777)
    outside = Path(open_dir) / "outside.txt"
    programs = {
        "infinite loop": "while True:\n    pass\n",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "memory bomb": "x = [bytearray(1 << 26) for _ in range(1000)]\n",
        "write outside": f"open({str(outside)!r}, 'w').write('x')\n",
        "connect": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
        "environment": (f"import os\nv = os.environ.get('MSC2_SECRET') or "
                        f"open('/proc/{os.getpid()}/environ', 'rb').read()\nassert b's3cret' in v or v == 's3cret'\n"),
        "daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n",
        "fine": "open('mine.txt', 'w').write('ok')\nassert open('mine.txt').read() == 'ok'\n",
    }
    t0 = time.perf_counter()
    results = dict(zip(programs, box.run_many(list(programs.values()))))
    wall = time.perf_counter() - t0
    for name in ("infinite loop", "fork bomb", "memory bomb", "write outside", "connect", "environment"):
        assert results[name].status != PASSED, (name, results[name])
    assert results["infinite loop"].status == TIMEOUT
    assert "MemoryError" in results["memory bomb"].error
    assert "Read-only file system" in results["write outside"].error and not outside.exists()
    assert "unreachable" in results["connect"].error or "refused" in results["connect"].error
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever connected
    assert results["daemon"].status == PASSED and results["fine"].status == PASSED
    for slot in range(box.workers):  # the fork bomb's and the daemon's children are gone
        assert processes_of(box.uid(slot)) == []
    # every program ended within its limit: two at a time, at most ~timeout each
    assert all(r.seconds < box.limits.timeout_s + 3 for r in results.values())
    assert wall < 60
    shutil.rmtree(open_dir)


def test_refuses_to_run_unisolated_unless_accepted(monkeypatch):
    monkeypatch.setattr(Sandbox, "_probe", lambda self: False)
    with pytest.raises(ConfigError, match="--allow-unisolated-execution"):
        Sandbox(workers=1)
    box = Sandbox(Limits(timeout_s=4, cpu_s=2), workers=1, allow_unisolated=True)
    assert not box.isolate
    assert box.run("import os\nassert 'HOME' not in os.environ\n").status == PASSED
    assert box.run("assert False\n").status == "failed"
    with pytest.raises(ConfigError, match="--workers"):
        Sandbox(workers=0)
