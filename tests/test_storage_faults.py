"""Storage faults (issue 15): a full disk under a node's spill directory and under the
GCS's data directory, and a GCS wiped or put back from an older copy.

Full disks are small tmpfs mounts inside a test host (tests/hosts.py: a mount
namespace of its own), filled with a filler file that the test removes to free space.
Each test says what the cluster must do and what the user sees."""

from __future__ import annotations

import json
import textwrap

import pytest
from hosts import Host, Hosts, hosts_fixture

pytestmark = pytest.mark.timeout(300)
one_host = hosts_fixture(1)

# Run in a host: a private cluster whose spill directory is a 130 MiB tmpfs, 95 MiB of it
# taken by a filler file: room for one spilled 30 MiB object, not two. Prints what it
# saw as JSON.
SPILL_DISK_FULL = """
import glob, json, os, subprocess, time
import numpy as np
import sdk as ray
from sdk.exceptions import GetTimeoutError, ObjectStoreFullError

MB = 1 << 20
ray.init(num_cpus=1, object_store_memory=100 * MB)
(session,) = glob.glob("/tmp/cairn-session-*")
spill = os.path.join(session, "spill")
os.makedirs(spill, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=130m", "spilldisk", spill], check=True)
filler = os.path.join(spill, "filler")
subprocess.run(["dd", "if=/dev/zero", "of=" + filler, "bs=1M", "count=95"],
               check=True, capture_output=True)
seen = {}

def value(n):
    return np.full(30 * MB // 8, n, dtype=np.int64)

def files():
    return sorted(f for f in os.listdir(spill) if f != "filler")

acked = [ray.put(value(n)) for n in range(4)]  # the 4th spills the 1st: the disk is full
seen["spilled_before"] = files()
try:
    ray.put(value(4))
    seen["put"] = None
except ObjectStoreFullError as exc:
    seen["put"] = str(exc)
seen["files_after_put"] = files()

@ray.remote
def make(n):
    return np.full(30 * MB // 8, n, dtype=np.int64)

try:
    ray.get(make.remote(5), timeout=60)
    seen["task"] = None
except ObjectStoreFullError as exc:  # the task's error, as an instance of its cause
    seen["task"] = [type(exc).__name__, str(exc)]
seen["files_after_task"] = files()
# what is in memory reads back while the disk is full; the spilled one cannot be
# brought back (room would need another spill) and waits, kept, not lost
seen["in_memory"] = [int(ray.get(r, timeout=30)[0]) for r in acked[1:]]
try:
    ray.get(acked[0], timeout=2)
    seen["spilled_read"] = "read"
except GetTimeoutError:
    seen["spilled_read"] = "waits"
os.unlink(filler)  # space is freed
seen["put_after"] = int(ray.get(ray.put(value(6)), timeout=60)[0])
seen["task_after"] = int(ray.get(make.remote(7), timeout=60)[-1])
seen["acked_after"] = [int(ray.get(r, timeout=60)[-1]) for r in acked]
seen["spill_ids"] = [r.hex() for r in acked]
import asyncio, asyncpg
async def spilled():
    conn = await asyncpg.connect(ray.get_runtime_context().gcs_address)
    try:
        return [r["entity_id"] for r in await conn.fetch(
            "SELECT entity_id FROM events WHERE event_type = 'spilled' ORDER BY position")]
    finally:
        await conn.close()
seen["spilled_events"] = asyncio.run(spilled())
ray.shutdown()
print(json.dumps(seen))
"""


def _run(host: Host, code: str, timeout: float = 240) -> dict:
    result = host.python(textwrap.dedent(code), timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_full_spill_disk_fails_the_put_clearly_and_spilling_resumes_once_freed(
    one_host: Hosts,
) -> None:
    """The store is full and its spill directory's disk too: the put and the task that
    need room fail with ObjectStoreFullError naming the directory and the cause (they
    no longer spin for ever), no half-written spill file stays, every acknowledged
    object is kept (the spilled one waits to be read back rather than being lost), and
    once space is freed new work spills again and every object reads back."""
    seen = _run(one_host[0], SPILL_DISK_FULL)
    first = seen["spill_ids"][0]
    assert seen["spilled_before"] == [first]
    for error in (seen["put"], seen["task"][1]):
        assert error is not None
        assert "cannot fit" in error and "/spill failed: No space left on device" in error
    assert seen["task"][0] == "RayTaskError(ObjectStoreFullError)"
    # the failed attempts left nothing half-written behind
    assert seen["files_after_put"] == seen["files_after_task"] == [first]
    assert seen["in_memory"] == [1, 2, 3]
    assert seen["spilled_read"] == "waits"
    assert seen["put_after"] == 6 and seen["task_after"] == 7
    assert seen["acked_after"] == [0, 1, 2, 3]
    # the first spill, then those that made room once space was freed
    assert seen["spilled_events"][0] == first and len(seen["spilled_events"]) >= 2
