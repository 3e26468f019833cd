"""A node daemon that dies and is started again adopts the objects its predecessor kept
for other nodes (controlplane/node/store_adoption.py): in one process, with real
regions in /dev/shm; and in a real cluster whose node daemon is killed while a driver
on the head holds the results of tasks that ran there (with max_retries=0: nothing
could rebuild them)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import numpy as np
import pytest
from machine_cluster import machine_cluster
from processes import gcs_url_of, next_daemon_id, pids_with

from controlplane import local_node
from controlplane.node.store_adoption import ADOPTED, adopt
from dataplane import protocol as p
from dataplane import shm
from dataplane.arena import SHM_DIR, aligned_size, region_name
from dataplane.object_table import ObjectTable
from dataplane.serialization import serialize
from dataplane.store_memory import StoreMemory

pytestmark = pytest.mark.timeout(180)
MB = 1024 * 1024


def _write(memory: StoreMemory, object_id: str, fill: int) -> p.ObjectLocation:
    value = serialize(np.full(MB // 8 - 64, fill, dtype=np.int64))
    room = memory.take(value.total_size)
    assert room is not None
    location = p.ObjectLocation(object_id, region=room[0], offset=room[1], size=value.total_size)
    shm.write_object(memory.prefix, location, value)
    return location


def _bytes(prefix: str, location: p.ObjectLocation) -> bytes:
    view = shm.object_view(prefix, location)
    try:
        return bytes(view)
    finally:
        view.release()


@pytest.fixture
def prefixes() -> Iterator[tuple[str, str]]:
    old, new = f"adopt-{uuid.uuid4().hex}", f"adopt-{uuid.uuid4().hex}"
    try:
        yield old, new
    finally:
        for prefix in (old, new):
            shm.unlink_all(prefix)
            shm.forget(prefix)


def test_a_new_daemon_adopts_the_objects_kept_in_its_predecessors_regions(
    prefixes: tuple[str, str],
) -> None:
    old, new = prefixes  # (a node daemon's regions are named by its node id)
    dead = StoreMemory(old, ObjectTable(4 * MB, on_free=lambda _location: None), chunk=2 * MB)
    kept_a, dropped, kept_b = (_write(dead, name, n) for n, name in enumerate("adb"))
    wanted = {at.object_id: _bytes(old, at) for at in (kept_a, kept_b)}
    shm.forget(old)  # the old daemon is gone: its tables with it; its regions stay
    objects = ObjectTable(4 * MB, on_free=lambda _location: None)
    memory = StoreMemory(new, objects, chunk=2 * MB)
    kept: set[str] = set()

    adopted = adopt(new, old, [kept_a, kept_b], memory, objects, kept)

    assert not list(SHM_DIR.glob(f"{old}-*"))  # taken over: renamed, same indices
    assert (SHM_DIR / region_name(new, kept_b.region)).exists()
    assert kept == {"a", "b"} and objects.used == kept_a.size + kept_b.size
    for at in (kept_a, kept_b):
        assert objects.state(at.object_id) == "stored"
        assert _bytes(new, objects.location(at.object_id)) == wanted[at.object_id]
    assert [(e.entity_id, e.event_type, e.payload["reason"]) for e in adopted.events] == [
        ("a", "transferred", ADOPTED),
        ("b", "transferred", ADOPTED),
    ]
    assert all(e.payload["from_node"] == old and e.node_id == new for e in adopted.events)
    # the dead writer's object ("d", never adopted) left free room; new objects go
    # there and elsewhere, never over an adopted one
    taken = [memory.take(kept_a.size) for _ in range(2)]
    assert None not in taken
    spans = {(at.region, at.offset, at.offset + aligned_size(at.size)) for at in (kept_a, kept_b)}
    for region, offset in [t for t in taken if t is not None]:
        for r, start, end in spans:
            assert r != region or offset + kept_a.size <= start or offset >= end
    assert (dropped.region, dropped.offset) in taken
    for at in (kept_a, kept_b):  # unchanged by what was taken
        assert _bytes(new, objects.location(at.object_id)) == wanted[at.object_id]
    # its owner releases it: freed, its room back
    used = objects.used
    objects.release("a")
    assert objects.state("a") == "freed" and objects.used == used - kept_a.size


def test_a_store_the_log_does_not_match_is_not_adopted(prefixes: tuple[str, str]) -> None:
    old, new = prefixes
    dead = StoreMemory(old, ObjectTable(4 * MB, on_free=lambda _location: None), chunk=2 * MB)
    first = _write(dead, "a", 1)
    overlapping = p.ObjectLocation("b", region=first.region, offset=first.offset + 64, size=MB)
    shm.forget(old)
    objects = ObjectTable(4 * MB, on_free=lambda _location: None)
    memory = StoreMemory(new, objects, chunk=2 * MB)
    kept: set[str] = set()

    adopted = adopt(new, old, [first, overlapping], memory, objects, kept)

    assert adopted.locations == [] and adopted.events == [] and not kept
    assert objects.used == 0 and objects.state("a") == "unknown"
    assert not list(SHM_DIR.glob(f"{old}-*")) and not list(SHM_DIR.glob(f"{new}-*"))
    assert memory.take(MB) is not None  # an empty store that works


# -- a real cluster ---------------------------------------------------------------------

DRIVER = """
import json, sys, time
import numpy as np
import sdk as ray
from sdk.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

ray.init(address=sys.argv[1])
there = Affinity(sys.argv[2], soft=False)

@ray.remote(max_retries=0, scheduling_strategy=there)
def make(i):
    return np.full(1_000_000, i, dtype=np.int64)

refs = [make.remote(i) for i in range(3)]
ready, _ = ray.wait(refs, num_returns=3, fetch_local=False, timeout=60)
print(json.dumps({"ready": len(ready), "ids": [r.hex() for r in refs]}), flush=True)
new_node = sys.stdin.readline().strip()  # its daemon is killed and started again
while new_node not in [n["NodeID"] for n in ray.nodes() if n["Alive"]]:
    time.sleep(0.05)  # (until the cluster has read its registration)
again = Affinity(new_node, soft=False)
fresh = [make.options(scheduling_strategy=again).remote(10 + i) for i in range(3)]
ray.wait(fresh, num_returns=3, fetch_local=False, timeout=60)  # made in its new store
values = ray.get(refs, timeout=60)
print(json.dumps({
    "intact": [bool((v == i).all()) for i, v in enumerate(values)],
    "fresh": [int(v[0]) for v in ray.get(fresh, timeout=60)],
}), flush=True)
"""


@pytest.fixture
def cluster() -> Iterator[tuple[local_node.NodeRecord, local_node.NodeRecord]]:
    with machine_cluster(["--num-cpus", "1"], ["--num-cpus", "1"]) as cluster:
        yield cluster.head, cluster.joined[0]


def test_the_objects_a_killed_daemon_kept_for_a_driver_are_there_after_its_restart(
    cluster: tuple[local_node.NodeRecord, local_node.NodeRecord],
) -> None:
    head, node = cluster
    assert head.address is not None
    old_id = (node.session_dir / "node.ready").read_text()
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, head.address, old_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert driver.stdout is not None and driver.stdin is not None
        made = json.loads(driver.stdout.readline() or "{}")
        assert made.get("ready") == 3, driver.stderr.read() if driver.stderr else ""
        (daemon_pid,) = pids_with("controlplane.node", str(node.session_dir))
        os.kill(daemon_pid, signal.SIGKILL)
        new_id = next_daemon_id(node.session_dir, old_id)
        driver.stdin.write(new_id + "\n")
        driver.stdin.flush()
        out, err = driver.communicate(timeout=120)
        assert driver.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert result == {"intact": [True, True, True], "fresh": [10, 11, 12]}
    rows = asyncio.run(_object_events(_gcs_url(head), made["ids"]))
    adopted = [r for r in rows if r["event_type"] == "transferred" and r["node_id"] == new_id]
    assert sorted(r["entity_id"] for r in adopted) == sorted(made["ids"])
    assert all(r["from_node"] == old_id for r in adopted)
    assert not [r for r in rows if r["event_type"] in ("lost", "reconstructing")]


def _gcs_url(head: local_node.NodeRecord) -> str:
    return gcs_url_of(head.session_dir)


async def _object_events(url: str, ids: list[str]) -> list[dict]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT entity_id, event_type, node_id, payload->>'from_node' AS from_node "
            "FROM events WHERE entity_id = ANY($1::text[]) "
            "OR (entity_kind = 'task' AND entity_id = ANY($2::text[])) ORDER BY position",
            ids,
            [i[:-8] for i in ids],
        )
    finally:
        await conn.close()
    return [dict(r) for r in rows]
