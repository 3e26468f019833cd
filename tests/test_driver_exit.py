"""A driver that exits without ``shutdown()`` (or is killed) leaves nothing behind:
no node daemon, worker or PostgreSQL process, no shared-memory segment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

DRIVER = """
import numpy as np, sdk as ray
ray.init(num_cpus=1)
@ray.remote
def big():
    return np.ones(20 * 1024 * 1024, dtype=np.uint8)
keep = big.remote()
assert ray.get(keep).sum() == 20 * 1024 * 1024
from sdk import runtime
print(ray.get_runtime_context().get_node_id(), runtime._runtime.head.session_dir, flush=True)
{ending}
"""


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmd:
                found.append(cmd)
    return found


def _leftovers(node_id: str, session_dir: str) -> list[str]:
    return [
        *_processes_mentioning(node_id),
        *_processes_mentioning(session_dir),
        *map(str, Path("/dev/shm").glob(f"{node_id}-*")),
    ]


def _assert_nothing_left(node_id: str, session_dir: str) -> None:
    deadline = time.monotonic() + 20
    while _leftovers(node_id, session_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers(node_id, session_dir) == []


@pytest.mark.parametrize("ending", ["", "import os; os._exit(0)", "KILL"])
def test_driver_exit_without_shutdown_cleans_up(ending: str) -> None:
    code = DRIVER.format(ending="import time; time.sleep(60)" if ending == "KILL" else ending)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    node_id, session_dir = proc.stdout.readline().split()
    assert len(node_id) == 32, node_id
    assert _processes_mentioning(node_id)  # its node daemon and workers run
    assert _processes_mentioning(session_dir)  # and its PostgreSQL
    if ending == "KILL":
        proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    _assert_nothing_left(node_id, session_dir)
    if not ending:  # a clean exit also removes the session directory
        assert not Path(session_dir).exists()
    else:  # after a crash, the next session sweeps it away
        from controlplane.session_dirs import sweep_stale

        sweep_stale()
        assert not Path(session_dir).exists()
