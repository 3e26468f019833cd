"""`cairn start --head` / `status` / `stop`, and drivers that connect to the running
cluster with ``init(address="auto")``: a detached actor outlives the driver that made
it and is found by name from a new driver; a non-detached one dies with its driver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import head as head_node

pytestmark = pytest.mark.timeout(180)

CAIRN = [sys.executable, "-m", "controlplane.cli"]

MAKER = """
import json, sdk as ray
ray.init(address="auto", namespace="audit")
@ray.remote
class Counter:
    def __init__(self):
        self.n = 0
    def add(self):
        self.n += 1
        return self.n
kept = Counter.options(name="kept", lifetime="detached").remote()
temp = Counter.options(name="temp").remote()
print(json.dumps({"kept": ray.get([kept.add.remote() for _ in range(3)]),
                  "temp": ray.get(temp.add.remote()),
                  "job": ray.get_runtime_context().get_job_id()}))
ray.shutdown()
"""

FINDER = """
import json, sdk as ray
ray.init(address="auto", namespace="audit")
found = {"kept": ray.get(ray.get_actor("kept").add.remote())}
try:
    ray.get_actor("temp")
    found["temp"] = "found"
except ValueError as exc:
    found["temp"] = str(exc)
try:
    ray.get_actor("kept", namespace="elsewhere")
    found["elsewhere"] = "found"
except ValueError:
    found["elsewhere"] = "missing"
found["job"] = ray.get_runtime_context().get_job_id()
print(json.dumps(found))
ray.shutdown()
"""


def _cairn(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*CAIRN, *args], capture_output=True, text=True, timeout=150, cwd=_root()
    )
    if check and result.returncode != 0:
        raise AssertionError(f"cairn {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def _driver(script: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=_root()
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _root() -> Path:
    return Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def cluster() -> Iterator[tuple[Path, int]]:
    if head_node.read_current() is not None and head_node.is_running(*head_node.read_current()):
        pytest.fail("a Cairn cluster is already running on this machine; `cairn stop` it")
    _cairn("start", "--head", "--num-cpus", "2", "--resources", '{"disk": 4}')
    found = head_node.read_current()
    assert found is not None
    try:
        yield found
    finally:
        _cairn("stop")


def test_detached_actor_outlives_its_driver_and_is_found_by_name(
    cluster: tuple[Path, int],
) -> None:
    made = _driver(MAKER)
    assert made["kept"] == [1, 2, 3] and made["temp"] == 1
    found = _driver(FINDER)
    assert found["kept"] == 4  # the same instance, its state kept
    assert "Failed to look up actor with name 'temp'" in found["temp"]
    assert found["elsewhere"] == "missing"
    assert found["job"] != made["job"]  # each driver is a job of the one cluster


def test_status_and_stop(cluster: tuple[Path, int]) -> None:
    session_dir, pid = cluster
    status = _cairn("status").stdout
    assert str(session_dir) in status and "(head)" in status
    assert "CPU          0/2 used" in status and "disk         0/4 used" in status
    assert "***" in status  # the GCS password is not shown
    again = _cairn("start", "--head", check=False)
    assert again.returncode != 0 and "already running" in again.stderr

    assert "stopped the cluster" in _cairn("stop").stdout
    assert not _alive(pid)
    assert head_node.read_current() is None
    deadline = time.monotonic() + 20
    while session_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not session_dir.exists()
    gone = _cairn("status", check=False)
    assert gone.returncode != 0 and "no running Cairn cluster" in gone.stderr
    assert "no Cairn cluster is running" in _cairn("stop").stdout


def test_connecting_without_a_cluster_fails_clearly() -> None:
    if head_node.read_current() is not None:
        pytest.fail("a Cairn cluster is recorded on this machine; `cairn stop` it")
    script = (
        "import sdk as ray\n"
        "try:\n    ray.init(address='auto')\nexcept ConnectionError as exc:\n    print(exc)\n"
        "try:\n    ray.init(address='auto', num_cpus=2)\nexcept ValueError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=_root()
    )
    assert "no running Cairn cluster was found" in result.stdout
    assert "num_cpus must not be provided" in result.stdout
