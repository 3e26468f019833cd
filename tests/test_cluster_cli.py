"""`cairn start --head` / `--address` / `status` / `stop`: nodes that join a head over
gRPC, membership in the log (a killed node is declared dead), and drivers that connect
with ``init(address="auto")``: a detached actor outlives the driver that made it and is
found by name from a new driver; a non-detached one dies with its driver."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from processes import gcs_url_of, next_daemon_id, pids_with, run_cairn

from controlplane import local_node

pytestmark = pytest.mark.timeout(180)


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
from sdk.util import placement_group
assert placement_group([{"CPU": 0.5}], name="kept-pg", lifetime="detached").wait(30)
assert placement_group([{"CPU": 0.5}], name="temp-pg").wait(30)
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
from sdk.util import get_placement_group
found["kept-pg"] = get_placement_group("kept-pg").wait(5)
try:
    get_placement_group("temp-pg")
    found["temp-pg"] = "found"
except ValueError:
    found["temp-pg"] = "gone"
found["job"] = ray.get_runtime_context().get_job_id()
print(json.dumps(found))
ray.shutdown()
"""


def _cairn(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cairn(*args, check=check)


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
def cluster() -> Iterator[local_node.NodeRecord]:
    if local_node.local_nodes():
        pytest.fail("Cairn nodes are already running on this machine; `cairn stop` them")
    _cairn(
        "start",
        "--head",
        "--port",
        "0",
        "--num-cpus",
        "2",
        "--resources",
        '{"disk": 4}',
        "--log-shards",
        "4",
        "--log-servers",
        "2",
    )  # (a sharded log on two servers: the cluster's jobs each in a shard, on the server
    # that holds it; its nodes' events in shard 0, on server 0)
    head = local_node.running_head()
    assert head is not None and head.address is not None
    try:
        yield head
    finally:
        _cairn("stop")


def test_detached_actor_outlives_its_driver_and_is_found_by_name(
    cluster: local_node.NodeRecord,
) -> None:
    made = _driver(MAKER)
    assert made["kept"] == [1, 2, 3] and made["temp"] == 1
    found = _driver(FINDER)
    assert found["kept"] == 4  # the same instance, its state kept
    assert "Failed to look up actor with name 'temp'" in found["temp"]
    assert found["elsewhere"] == "missing"
    assert found["kept-pg"] is True and found["temp-pg"] == "gone"  # groups: the same
    assert found["job"] != made["job"]  # each driver is a job of the one cluster


def test_nodes_join_and_a_killed_node_is_declared_dead(
    cluster: local_node.NodeRecord,
) -> None:
    assert cluster.address is not None
    _cairn("start", "--address", cluster.address, "--num-cpus", "1", "--resources", '{"gpu_x": 2}')
    _cairn("start", "--address", cluster.address, "--num-cpus", "1")
    workers = [n for n in local_node.local_nodes() if not n.head]
    assert len(workers) == 2
    status = _cairn("status").stdout
    assert "3 nodes alive, 0 dead" in status
    assert "(head)" in status and "disk         0/4 used" in status
    assert "gpu_x        0/2 used" in status
    # the runtime role's login (migration 0010), no password shown
    assert "***" in status and "postgresql://cairn_runtime:***@" in status

    by_address = _driver(
        "import json, sdk as ray\n"
        f"ray.init(address={cluster.address!r})\n"
        "print(json.dumps({'node': ray.get_runtime_context().get_node_id()}))\n"
    )
    assert by_address["node"] == (cluster.session_dir / "node.ready").read_text()
    for count, span in asyncio.run(_heartbeats_per_node(_gcs_url(cluster))):
        assert count <= span + 1  # load heartbeats: at most one per node per second

    victim = workers[0]
    victim_id = (victim.session_dir / "node.ready").read_text()
    os.killpg(os.getpgid(victim.pid), signal.SIGKILL)  # the whole node, at once
    killed_at = time.monotonic()
    cause = None
    while cause is None and time.monotonic() - killed_at < 20:
        cause = asyncio.run(_death_cause(_gcs_url(cluster), victim_id))
        time.sleep(0.1)
    detected_after = time.monotonic() - killed_at
    assert cause is not None and "missed heartbeats" in cause
    assert detected_after < 6  # pings every 0.25 s, dead after 1.5 s without one
    from controlplane.eventlog.servers import log_urls

    other = asyncio.run(log_urls(_gcs_url(cluster)))[1]  # fenced there too, before `dead`
    assert (victim_id,) in asyncio.run(_fetch(other, "SELECT node_id FROM node_fences"))
    status = _cairn("status").stdout
    assert "2 nodes alive, 1 dead" in status and f"node {victim_id} DEAD" in status

    # a node daemon killed alone (its node's process lives) is started again, under a
    # new id, and takes work; the old id is declared dead
    survivor = workers[1]
    old_id = (survivor.session_dir / "node.ready").read_text()
    (daemon_pid,) = pids_with("controlplane.node", str(survivor.session_dir))
    os.kill(daemon_pid, signal.SIGKILL)
    new_id = next_daemon_id(survivor.session_dir, old_id)
    deadline = time.monotonic() + 30
    (again,) = [n for n in local_node.local_nodes() if n.pid == survivor.pid]
    assert again.address == survivor.address  # on the same port: nothing to re-point
    while asyncio.run(_death_cause(_gcs_url(cluster), old_id)) is None:
        assert time.monotonic() < deadline, "the killed daemon's id was not declared dead"
        time.sleep(0.1)
    ran_on = _driver(
        "import json, sdk as ray\n"
        "from sdk.util.scheduling_strategies import NodeAffinitySchedulingStrategy as A\n"
        f"ray.init(address={cluster.address!r})\n"
        "where = ray.remote(lambda: ray.get_runtime_context().get_node_id())\n"
        f"there = where.options(scheduling_strategy=A({new_id!r}, soft=False))\n"
        "print(json.dumps({'node': ray.get(there.remote(), timeout=60)}))\n"
    )
    assert ran_on["node"] == new_id


JOB = """
import json, sdk as ray
ray.init(address="auto")
@ray.remote
def inc(x):
    return x + 1
@ray.remote
class Total:
    def __init__(self):
        self.n = 0
    def add(self, x):
        self.n += x
        return self.n
total = Total.remote()
values = ray.get([inc.remote(i) for i in range(10)])
print(json.dumps({"job": ray.get_runtime_context().get_job_id(),
                  "sum": ray.get([total.add.remote(v) for v in values])[-1]}))
ray.shutdown()
"""


def test_a_log_on_two_servers_takes_each_job_on_one_and_reads_as_one(
    cluster: local_node.NodeRecord,
) -> None:
    from controlplane.eventlog.servers import log_urls

    urls = asyncio.run(log_urls(_gcs_url(cluster)))
    assert len(urls) == 2
    jobs_on: list[set[object]] = [set(), set()]
    ran = []
    while not all(jobs_on) and len(ran) < 16:  # each job's shard: a hash of its id
        ran.append(_driver(JOB))
        assert ran[-1]["sum"] == 55
        jobs_on = [{row[0] for row in asyncio.run(_fetch(url, JOBS_SQL))} for url in urls]
    assert all(jobs_on), f"{len(ran)} jobs, all on one server"
    assert not jobs_on[0] & jobs_on[1]  # every event of a job on the one server of its shard
    assert jobs_on[0] | jobs_on[1] == {job["job"] for job in ran}

    # `cairn sql` reads the whole log, its views too (the union on server 0, postgres_fdw)
    # (the tasks' events: the nodes' heartbeats go on meanwhile)
    tasks_sql = "SELECT count(*) FROM events WHERE entity_kind = 'task'"
    counts = [asyncio.run(_fetch(url, tasks_sql))[0][0] for url in urls]
    whole = _cairn(
        "sql",
        "--format",
        "json",
        "SELECT count(*) AS n, count(DISTINCT position) AS positions FROM events "
        "WHERE entity_kind = 'task'",
    ).stdout
    assert json.loads(whole) == [{"n": sum(counts), "positions": sum(counts)}]
    finished = _cairn(
        "sql",
        "--format",
        "json",
        "SELECT count(*) AS n FROM tasks WHERE state = 'FINISHED' AND actor_id IS NULL",
    ).stdout
    assert json.loads(finished) == [{"n": 10 * len(ran)}]


JOBS_SQL = "SELECT DISTINCT job_id FROM events WHERE entity_kind = 'task'"


def test_status_and_stop(cluster: local_node.NodeRecord) -> None:
    status = _cairn("status").stdout
    assert "(head)" in status and "1 nodes alive" in status
    assert "CPU          0/2 used" in status
    again = _cairn("start", "--head", "--port", "0", check=False)
    assert again.returncode != 0 and "already running" in again.stderr
    layout = "SELECT shard_count, server_index, server_count FROM event_log_head"
    assert asyncio.run(_fetch(_gcs_url(cluster), layout)) == [(4, 0, 2)]  # (--log-shards, -servers)
    refused = _cairn("start", "--address", "127.0.0.1:1", "--log-shards", "4", check=False)
    assert refused.returncode != 0 and "--log-shards is for the head" in refused.stderr
    refused = _cairn("start", "--address", "127.0.0.1:1", "--log-servers", "2", check=False)
    assert refused.returncode != 0 and "--log-servers is for the head" in refused.stderr
    # maintenance on every server, each as its owner (its password in its own directory)
    gc = _cairn("gc", "--older-than", "7d", "--dry-run").stdout.splitlines()
    assert [line.split(":")[0] for line in gc] == ["server 0", "server 1"], gc
    listed = _cairn("partitions", "list").stdout.splitlines()
    assert "server 1:" in listed and "attached" in listed[-1], listed
    node_id = (cluster.session_dir / "node.ready").read_text()
    memory = _cairn("memory", "--units", "MB").stdout  # the head's object store
    assert f"Object store of node {node_id}" in memory and "objects;" in memory

    log = local_node.node_log(cluster.pid)
    assert "is running at" in log.read_text()  # the head's output, kept while it runs
    stopped = _cairn("stop").stdout
    assert not log.exists()
    assert "stopped the head" in stopped
    assert not _alive(cluster.pid)
    assert local_node.local_nodes() == []
    deadline = time.monotonic() + 20
    while cluster.session_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not cluster.session_dir.exists()
    gone = _cairn("status", check=False)
    assert gone.returncode != 0 and "no running Cairn cluster" in gone.stderr
    assert "no Cairn node is running" in _cairn("stop").stdout


def test_joining_a_wrong_address_fails_fast() -> None:
    started = time.monotonic()
    refused = _cairn("start", "--address", "127.0.0.1:1", check=False)
    assert refused.returncode != 0
    assert "cannot reach a Cairn head at 127.0.0.1:1" in refused.stderr
    assert time.monotonic() - started < 30
    malformed = _cairn("start", "--address", "nowhere", check=False)
    assert "the address must be HOST:PORT, got 'nowhere'" in malformed.stderr
    neither = _cairn("start", check=False)
    assert "pass either --head or --address" in neither.stderr
    assert local_node.local_nodes() == []


def _gcs_url(head: local_node.NodeRecord) -> str:
    return gcs_url_of(head.session_dir)


async def _fetch(url: str, sql: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


async def _heartbeats_per_node(url: str) -> list[tuple[int, float]]:
    """(heartbeat events, seconds from registration to now) of each node."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT count(*) FILTER (WHERE event_type = 'heartbeat') AS beats, "
            "extract(epoch FROM clock_timestamp() - min(recorded_at))::float AS span "
            "FROM events WHERE entity_kind = 'node' GROUP BY entity_id"
        )
    finally:
        await conn.close()
    assert len(rows) == 3
    return [(r["beats"], r["span"]) for r in rows]


async def _death_cause(url: str, node_id: str) -> str | None:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(
            "SELECT payload->>'cause' FROM events WHERE entity_kind = 'node' "
            "AND entity_id = $1 AND event_type = 'dead'",
            node_id,
        )
    finally:
        await conn.close()


def test_connecting_without_a_cluster_fails_clearly() -> None:
    if local_node.local_nodes():
        pytest.fail("Cairn nodes are running on this machine; `cairn stop` them")
    script = (
        "import sdk as ray\n"
        "try:\n    ray.init(address='auto')\nexcept ConnectionError as exc:\n    print(exc)\n"
        "try:\n    ray.init(address='auto', num_cpus=2)\nexcept ValueError as exc:\n"
        "    print(exc)\n"
        "try:\n    ray.init(address='127.0.0.1:1')\nexcept ConnectionError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=_root()
    )
    assert "no running Cairn cluster was found" in result.stdout
    assert "num_cpus must not be provided" in result.stdout
    assert "no node of the cluster at 127.0.0.1:1 runs on this machine" in result.stdout
