"""Bottom-up scheduling on a real three-node cluster on this machine (a head with 1 CPU
and two nodes with 2, each its own process group and store): tasks the driver's node
cannot run now spill to the global scheduler, which places each one once (even with
two schedulers, or one killed mid-run); arguments and results move between nodes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from log_rows import fetch_rows, wait_for_rows
from machine_cluster import machine_cluster, node_id
from processes import pids_with, run_cairn

import sdk as ray
from controlplane import local_node
from controlplane.node_records import node_log
from sdk.exceptions import ActorDiedError, GetTimeoutError, TaskUnschedulableError
from sdk.util.scheduling_strategies import NodeAffinitySchedulingStrategy

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent


def _cairn(*args: str) -> str:
    return run_cairn(*args).stdout


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    big = ["--num-cpus", "2", "--resources", '{"big": 1}']
    with machine_cluster(["--num-cpus", "1"], ["--num-cpus", "2"], big) as cluster:
        ray.init(address="auto")
        try:
            yield {
                "head": node_id(cluster.head),
                "node1": node_id(cluster.joined[0]),
                "node2": node_id(cluster.joined[1]),
                "url": ray.get_runtime_context().gcs_address,
            }
        finally:
            ray.shutdown()


@ray.remote(num_cpus=1)
def where(i: int) -> tuple[str, int]:
    time.sleep(0.3)
    return ray.get_runtime_context().get_node_id(), i * i


@ray.remote(num_cpus=2)
def on_two_cpus() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=2)
def make_array(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


@ray.remote(num_cpus=2)
def digest(array: np.ndarray) -> tuple[str, str]:
    return hashlib.sha256(array).hexdigest(), ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=1)
def total(array: np.ndarray) -> tuple[int, str]:
    return int(array.sum()), ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=1)
def quick(i: int) -> int:
    time.sleep(0.01)
    return i + 1


def _placements(url: str) -> dict[tuple[str, int], int]:
    rows = asyncio.run(
        fetch_rows(
            url,
            "SELECT entity_id, (payload->>'attempt')::int AS attempt, count(*) AS n "
            "FROM events WHERE event_type = 'placed' GROUP BY 1, 2",
        )
    )
    return {(r["entity_id"], r["attempt"]): r["n"] for r in rows}


def _spills(url: str) -> set[tuple[str, int]]:
    rows = asyncio.run(
        fetch_rows(
            url,
            "SELECT entity_id, (payload->>'attempt')::int AS attempt FROM events "
            "WHERE event_type = 'spilled'",
        )
    )
    return {(r["entity_id"], r["attempt"]) for r in rows}


def test_tasks_that_do_not_fit_spill_to_other_nodes(cluster: dict[str, str]) -> None:
    refs = [where.remote(i) for i in range(12)]
    results = ray.get(refs, timeout=120)
    assert [value for _, value in results] == [i * i for i in range(12)]
    used = {node for node, _ in results}
    assert len(used) >= 2 and used <= {cluster["head"], cluster["node1"], cluster["node2"]}
    spilled = _spills(cluster["url"])
    placements = _placements(cluster["url"])
    assert {ref.task_id().hex() for ref in refs} & {task for task, _ in spilled}
    assert all(placements.get(spill) == 1 for spill in spilled)  # each placed exactly once
    # a task needing 2 CPUs can only run on a 2-CPU node
    assert ray.get(on_two_cpus.remote(), timeout=60) in (cluster["node1"], cluster["node2"])


def _daemon_pids() -> list[int]:
    pids = []
    for record in local_node.local_nodes():
        node_id = (record.session_dir / "node.ready").read_text()
        pids += pids_with("controlplane.node", node_id)
    return pids


def _private_memory(pid: int) -> int:
    """Bytes of the process's own (anonymous) memory; mapped store segments excluded."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def test_objects_move_between_nodes_intact_in_bounded_memory(cluster: dict[str, str]) -> None:
    n = 62_500_000  # 500 MB of int64, made on a 2-CPU node, pulled back in 1 MiB chunks
    daemons = _daemon_pids()
    assert len(daemons) == 3
    warm = ray.get(make_array.remote(2_500_000), timeout=120)  # gRPC and buffers set up
    ray.get(digest.remote(ray.put(warm)), timeout=120)
    before = {pid: _private_memory(pid) for pid in daemons}
    peak = dict(before)
    sampling = True

    def sample() -> None:
        while sampling:
            for pid in daemons:
                peak[pid] = max(peak[pid], _private_memory(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        array = ray.get(make_array.remote(n), timeout=120)
        # and sent as an argument from the driver's node to a task that must run elsewhere
        got, node = ray.get(digest.remote(ray.put(array)), timeout=120)
    finally:
        sampling = False
        sampler.join()
    expected = hashlib.sha256(np.arange(n, dtype=np.int64)).hexdigest()
    assert hashlib.sha256(array).hexdigest() == expected
    assert got == expected and node != cluster["head"]
    growth = max(peak[pid] - before[pid] for pid in daemons)
    # bounded by the chunks in flight, not the object: 500 MB moved twice
    assert growth < 64 * 1024 * 1024, f"a node daemon grew by {growth:,} bytes"
    moved = asyncio.run(
        fetch_rows(
            cluster["url"],
            "SELECT count(*) AS n FROM events WHERE event_type = 'transferred' "
            "AND (payload->>'size_bytes')::bigint >= 500000000",
        )
    )
    assert moved[0]["n"] >= 2  # the result back home, the argument out


def test_a_task_runs_where_its_big_argument_is_when_it_fits(cluster: dict[str, str]) -> None:
    big = ray.put(np.ones(25_000_000, dtype=np.int64))  # 200 MB on the driver's node
    value, node = ray.get(total.remote(big), timeout=120)
    assert value == 25_000_000 and node == cluster["head"]


@ray.remote(resources={"big": 1})
def kept_there(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.uint8)


def test_memory_summary_shows_every_nodes_store(cluster: dict[str, str]) -> None:
    from sdk._private.internal_api import memory_summary

    there = kept_there.remote(3_000_000)  # stays on the "big" node until fetched
    ray.wait([there], fetch_local=False, timeout=60)
    text = memory_summary()
    sections = text.split("======== Object store of node ")[1:]
    by_node = {section.split()[0]: section for section in sections}
    assert set(by_node) == {cluster["head"], cluster["node1"], cluster["node2"]}
    assert there.hex() in by_node[cluster["node2"]]
    assert "--- Cluster: 3 nodes" in text
    printed = _cairn("memory", "--stats-only")
    assert printed.count("Object store of node") == 3 and there.hex() not in printed
    del there


def test_infeasible_work_is_reported_not_silently_queued(
    cluster: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    @ray.remote(resources={"unobtainium": 1})
    class Unplaceable:
        def ping(self) -> str:
            return "pong"

    ref = where.options(resources={"unobtainium": 1}).remote(1)
    actor = Unplaceable.remote()
    with pytest.raises(GetTimeoutError):
        ray.get([ref, actor.ping.remote()], timeout=3)
    status = _cairn("status")
    assert "infeasible tasks or actors" in status and "unobtainium" in status
    assert f"task {ref.task_id().hex()}" in status
    warned = caplog.text  # the driver is warned, as Ray's is
    assert f"({ref.task_id().hex()}) cannot be scheduled now" in warned
    assert "Unplaceable.__init__" in warned and "unobtainium" in warned
    ray.cancel(ref)
    ray.kill(actor)


def _scheduler_pids(url: str) -> list[int]:
    return pids_with("controlplane.scheduler", url, environ=True)


def test_two_global_schedulers_never_place_a_task_twice(cluster: dict[str, str]) -> None:
    url = cluster["url"]
    second = subprocess.Popen(
        [sys.executable, "-m", "controlplane.scheduler", "--gcs-url", url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert second.stdout is not None and second.stdout.readline() == "following the log\n"
        refs = [quick.remote(i) for i in range(300)]
        assert ray.get(refs, timeout=180) == [i + 1 for i in range(300)]
    finally:
        second.terminate()
        second.wait(30)
    placements = _placements(url)
    assert placements and max(placements.values()) == 1
    ours = {ref.task_id().hex() for ref in refs}
    spilled = {spill for spill in _spills(url) if spill[0] in ours}
    assert spilled and spilled <= set(placements)  # every spill placed, none twice


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (by SIGSTOP): its state in /proc is T."""
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state in ("T", "t")


def _spilled_and_placed(url: str, refs: list[ray.ObjectRef]) -> set[tuple[str, int]]:
    """The spills of these tasks (task, attempt); each placed exactly once."""
    ours = {ref.task_id().hex() for ref in refs}
    spilled = {spill for spill in _spills(url) if spill[0] in ours}
    placements = _placements(url)
    assert all(placements.get(spill) == 1 for spill in spilled)
    return spilled


def test_a_paused_scheduler_resumed_after_its_replacement_places_nothing_twice(
    cluster: dict[str, str],
) -> None:
    url = cluster["url"]
    (paused,) = _scheduler_pids(url)
    os.kill(paused, signal.SIGSTOP)  # a zombie: alive, silent, its view going stale
    deadline = time.monotonic() + 10
    while not _stopped(paused):
        assert time.monotonic() < deadline, "the scheduler did not stop"
        time.sleep(0.01)
    replacement = subprocess.Popen(
        [sys.executable, "-m", "controlplane.scheduler", "--gcs-url", url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert replacement.stdout is not None
        assert replacement.stdout.readline() == "following the log\n"
        refs = [quick.remote(i) for i in range(200)]
        assert ray.get(refs, timeout=180) == [i + 1 for i in range(200)]
        # spilled while the paused one stood still: the replacement placed them, and the
        # paused one has them in the log ahead of it, unread
        assert _stopped(paused) and _spilled_and_placed(url, refs)
        os.kill(paused, signal.SIGCONT)  # it wakes up and catches up with the log
        replacement.terminate()
        replacement.wait(30)
        # the woken one is the only scheduler now: it places these once it has read past
        # the spills it slept through
        later = [quick.remote(i) for i in range(50)]
        assert ray.get(later, timeout=120) == list(range(1, 51))
        assert _spilled_and_placed(url, later)
    finally:
        os.kill(paused, signal.SIGCONT)
        replacement.terminate()
        replacement.wait(30)
    placements = _placements(url)
    assert placements and max(placements.values()) == 1  # nothing placed twice
    assert _scheduler_pids(url) == [paused]


def test_a_killed_global_scheduler_is_replaced_and_resumes(cluster: dict[str, str]) -> None:
    url = cluster["url"]
    (victim,) = _scheduler_pids(url)
    refs = [quick.remote(i) for i in range(3_000)]
    ours = [ref.task_id().hex() for ref in refs]
    placed_by_victim = wait_for_rows(  # it is placing our spills
        url, "SELECT 1 FROM events WHERE event_type = 'placed' AND entity_id = ANY($1)", ours
    )
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    assert placed_by_victim and len(done) < len(refs)  # the kill lands mid-run
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not [pid for pid in _scheduler_pids(url) if pid != victim]:
        assert time.monotonic() < deadline, "the global scheduler was not started again"
        time.sleep(0.05)
    (restarted_at,) = asyncio.run(fetch_rows(url, "SELECT max(position) AS p FROM events"))
    assert ray.get(refs, timeout=280) == [i + 1 for i in range(3_000)]
    assert _scheduler_pids(url) and victim not in _scheduler_pids(url)  # restarted
    placed_after = asyncio.run(
        fetch_rows(
            url,
            "SELECT count(*) AS n FROM events WHERE event_type = 'placed' "
            "AND entity_id = ANY($1) AND position > $2",
            ours,
            restarted_at["p"],
        )
    )
    assert placed_after[0]["n"] > 0  # the new one placed what was left
    placements = _placements(url)
    assert max(placements.values()) == 1
    retried = asyncio.run(
        fetch_rows(url, "SELECT count(*) AS n FROM events WHERE event_type = 'retried'")
    )
    assert retried[0]["n"] == 0  # no task ran twice


@ray.remote(num_cpus=0.5)
def node_of() -> str:
    time.sleep(0.05)
    return ray.get_runtime_context().get_node_id()


def test_spread_and_node_affinity(cluster: dict[str, str]) -> None:
    spread = ray.get([node_of.options(scheduling_strategy="SPREAD").remote() for _ in range(6)])
    assert set(spread) == {cluster["head"], cluster["node1"], cluster["node2"]}
    for target in ("node1", "node2", "head"):
        strategy = NodeAffinitySchedulingStrategy(cluster[target], soft=False)
        assert ray.get(node_of.options(scheduling_strategy=strategy).remote()) == cluster[target]
    gone = "f" * 32
    soft = NodeAffinitySchedulingStrategy(gone, soft=True)
    assert ray.get(node_of.options(scheduling_strategy=soft).remote(), timeout=60)
    hard = NodeAffinitySchedulingStrategy(gone, soft=False)
    with pytest.raises(TaskUnschedulableError, match="not alive"):
        ray.get(node_of.options(scheduling_strategy=hard).remote(), timeout=60)
    with pytest.raises(ValueError, match="scheduling_strategy"):
        node_of.options(scheduling_strategy="EVERYWHERE")
    # more bundles than nodes: never ready
    from sdk.util import placement_group, remove_placement_group

    four = placement_group([{"CPU": 0.1}] * 4, strategy="STRICT_SPREAD")
    assert not four.wait(2)
    remove_placement_group(four)


def test_placement_groups_across_nodes(cluster: dict[str, str]) -> None:
    from sdk.util import placement_group, placement_group_table, remove_placement_group
    from sdk.util.scheduling_strategies import PlacementGroupSchedulingStrategy as InGroup

    nodes = {cluster["head"], cluster["node1"], cluster["node2"]}
    for _ in range(2):  # the second time on resources the first gave back
        spread = placement_group([{"CPU": 0.5}] * 3, strategy="STRICT_SPREAD")
        assert spread.wait(60)
        where_bundles = placement_group_table(spread)["bundles_to_node_id"]
        assert set(where_bundles.values()) == nodes  # one bundle per node
        for index, node in where_bundles.items():
            task = node_of.options(scheduling_strategy=InGroup(spread, index))
            assert ray.get(task.remote(), timeout=60) == node
        remove_placement_group(spread)
    packed = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK")
    assert packed.wait(60)
    (node,) = set(placement_group_table(packed)["bundles_to_node_id"].values())
    assert node in (cluster["node1"], cluster["node2"])  # the head has 1 CPU
    assert ray.get(node_of.options(scheduling_strategy=InGroup(packed)).remote()) == node

    @ray.remote(num_cpus=1)
    class Where:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    actor = Where.options(scheduling_strategy=InGroup(packed, 0)).remote()
    assert ray.get(actor.node.remote(), timeout=60) == node  # the bundle's node
    ray.kill(actor)
    remove_placement_group(packed)


@ray.remote(resources={"big": 1})
class OnBig:
    def __init__(self, start: int, seed: np.ndarray | None = None) -> None:
        self.n = start + (int(seed.sum()) if seed is not None else 0)

    def add(self, x: int) -> tuple[int, str]:
        self.n += x
        return self.n, ray.get_runtime_context().get_node_id()

    def total(self, array: np.ndarray) -> int:
        return int(array.sum())


@ray.remote(num_cpus=1, resources={"big": 1})
def sums_of(refs: list[Any]) -> tuple[list[int], str]:
    """Gets refs that came inside its argument (not as arguments themselves)."""
    return [int(np.sum(value)) for value in ray.get(refs)], ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=1, resources={"big": 1})
def refs_made_there(big: bool) -> dict[str, Any]:
    """A value holding refs to objects put on this node; with ``big``, a value too
    large to travel in the log (it stays here until wanted)."""
    value: dict[str, Any] = {"refs": [ray.put(np.arange(250_000)), ray.put(np.arange(10))]}
    if big:
        value["bulk"] = np.ones(500_000)
    return value


@ray.remote(num_cpus=1, resources={"big": 1})
def yield_refs_there(count: int) -> Iterator[list[Any]]:
    for i in range(count):
        yield [ray.put(np.arange(i + 1))]


def test_refs_inside_values_cross_nodes(cluster: dict[str, str]) -> None:
    """Refs inside an argument's value are fetched from the caller's node (one whose
    bytes stayed on a third node, from there), and refs inside a value a task returns
    from another node are got here, whether that value came here or stayed there."""
    made_here = [ray.put(np.arange(250_000)), ray.put(np.arange(10))]
    sums, node = ray.get(sums_of.remote(made_here), timeout=60)
    assert node == cluster["node2"] and sums == [int(np.arange(250_000).sum()), 45]

    for big in (False, True):
        value = ray.get(refs_made_there.remote(big), timeout=60)
        arrays = ray.get(value["refs"], timeout=60)
        assert [int(a.sum()) for a in arrays] == [int(np.arange(250_000).sum()), 45]
        assert big == ("bulk" in value)

    stream = yield_refs_there.options(num_returns="streaming").remote(3)
    assert [int(ray.get(ray.get(ref, timeout=60)[0], timeout=60).sum()) for ref in stream] == [
        0,
        1,
        3,
    ]

    on_node1 = NodeAffinitySchedulingStrategy(cluster["node1"], soft=False)
    left_on_node1 = make_array.options(scheduling_strategy=on_node1).remote(300_000)
    ray.wait([left_on_node1], fetch_local=False, timeout=60)
    sums, node = ray.get(sums_of.remote([left_on_node1]), timeout=60)
    assert node == cluster["node2"] and sums == [int(np.arange(300_000).sum())]


def test_an_actor_lives_on_the_node_that_has_its_resources(cluster: dict[str, str]) -> None:
    actor = OnBig.remote(10)
    results = ray.get([actor.add.remote(1) for _ in range(200)], timeout=120)
    assert [n for n, _ in results] == list(range(11, 211))  # in order, one instance
    assert {node for _, node in results} == {cluster["node2"]}  # the one with "big"
    big = ray.put(np.ones(5_000_000, dtype=np.int64))  # 40 MB, pulled from the driver's node
    assert ray.get(actor.total.remote(big), timeout=60) == 5_000_000
    forwarded = asyncio.run(
        fetch_rows(
            cluster["url"],
            "SELECT count(*) AS n FROM events WHERE event_type = 'forwarded' "
            "AND payload->>'actor_id' = $1",
            actor._actor_id,
        )
    )
    assert forwarded[0]["n"] == 201  # every call handed to its node through the log
    ray.kill(actor)
    with pytest.raises(ActorDiedError, match="killed"):
        ray.get(actor.add.remote(1), timeout=60)


def test_a_remote_actor_restarts_on_its_node_with_its_arguments(cluster: dict[str, str]) -> None:
    seed = ray.put(np.ones(1_000_000, dtype=np.int64))  # 8 MB, a ref constructor argument
    actor = OnBig.options(max_restarts=1, max_task_retries=-1).remote(0, seed)
    del seed  # the actor's node keeps its copy for restarts
    assert ray.get(actor.add.remote(1), timeout=60)[0] == 1_000_001
    ray.kill(actor, no_restart=False)  # as a crash: restarted, constructor re-run
    value, node = ray.get(actor.add.remote(1), timeout=60)
    assert value == 1_000_001 and node == cluster["node2"]  # a fresh instance, same node
    ray.kill(actor)


@ray.remote(num_cpus=2, max_retries=2)
def slow_on_two(seconds: float) -> str:
    time.sleep(seconds)
    return ray.get_runtime_context().get_node_id()


def _add_node() -> tuple[local_node.NodeRecord, str]:
    """A node joined for a test that kills it (so the cluster keeps its shape)."""
    head = local_node.running_head()
    assert head is not None and head.address is not None
    before = {n.pid for n in local_node.local_nodes()}
    _cairn("start", "--address", head.address, "--num-cpus", "2")
    (added,) = [n for n in local_node.local_nodes() if n.pid not in before]
    return added, (added.session_dir / "node.ready").read_text()


def _why_not_done(url: str, actor_id: str, doomed: local_node.NodeRecord) -> str:
    """What a test that timed out waiting for an actor moved off a dead node needs to
    say why: the actor's events, the nodes' deaths, and the end of each node's output
    (the killed node's too)."""
    events = asyncio.run(
        fetch_rows(
            url,
            "SELECT position, entity_kind::text AS kind, entity_id, event_type, node_id, "
            "payload::text AS payload FROM events WHERE entity_id = $1 "
            "OR payload->>'actor_id' = $1 OR (entity_kind = 'node' AND event_type = 'dead') "
            "ORDER BY position",
            actor_id,
        )
    )
    lines = [f"events of actor {actor_id} and the nodes' deaths:"]
    lines += [
        f"  {e['position']} {e['kind']} {e['entity_id'][:12]} {e['event_type']} "
        f"node={(e['node_id'] or '')[:12]} {e['payload'][:200]}"
        for e in events
    ]
    for record in [*local_node.local_nodes(), doomed]:
        path = node_log(record.pid)
        tail = path.read_text(errors="replace")[-3000:] if path.exists() else "(no output)"
        lines += [f"--- {path}", tail]
    return "\n".join(lines)


@ray.remote
class Recorder:
    def __init__(self) -> None:
        self.instance = os.urandom(4).hex()
        self.calls = 0  # in the order this instance ran them

    def call(self, i: int) -> tuple[str, int, str, int]:
        time.sleep(0.02)
        self.calls += 1
        return self.instance, i, ray.get_runtime_context().get_node_id(), self.calls


def test_an_actor_whose_node_dies_is_made_again_elsewhere_with_its_calls(
    cluster: dict[str, str],
) -> None:
    doomed, doomed_id = _add_node()
    there = NodeAffinitySchedulingStrategy(doomed_id, soft=True)
    actor = Recorder.options(
        scheduling_strategy=there, max_restarts=1, max_task_retries=-1
    ).remote()
    first = ray.get(actor.call.remote(-1), timeout=60)
    assert first[2] == doomed_id
    refs = [actor.call.remote(i) for i in range(100)]
    deadline = time.monotonic() + 60
    while len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < 10:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(os.getpgid(doomed.pid), signal.SIGKILL)
    try:
        results = ray.get(refs, timeout=120)  # every call completes
    except GetTimeoutError:
        pytest.fail(_why_not_done(cluster["url"], actor._actor_id, doomed))
    instances = list(dict.fromkeys(result[0] for result in results))
    assert len(instances) == 2 and instances[0] == first[0]  # one restart, in the middle
    for instance in instances:  # each instance ran its calls in the caller's order
        ran = [(seq, i) for who, i, _, seq in results if who == instance]
        assert sorted(ran) == sorted(ran, key=lambda pair: pair[1])
    assert {node for who, _, node, _ in results if who == instances[1]} & {doomed_id} == set()
    assert first[3] == 1 and next(seq for who, *_, seq in results if who == instances[1]) == 1
    events = asyncio.run(
        fetch_rows(
            cluster["url"],
            "SELECT event_type, payload->>'cause' AS cause FROM events "
            "WHERE entity_id = $1 ORDER BY position",
            actor._actor_id,
        )
    )
    assert ("restarting", f"its node {doomed_id} died") in [
        (e["event_type"], e["cause"]) for e in events
    ]
    ray.kill(actor)


@ray.remote
class Tally:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def add(self, n: int) -> list[int]:
        self.seen.append(n)
        return self.seen


def test_an_actor_moved_off_a_dead_node_replays_its_calls(cluster: dict[str, str]) -> None:
    doomed, doomed_id = _add_node()
    there = NodeAffinitySchedulingStrategy(doomed_id, soft=True)
    tally = Tally.options(
        scheduling_strategy=there,
        max_restarts=1,
        max_task_retries=-1,
        replay_calls_on_restart=True,
    ).remote()
    assert ray.get([tally.add.remote(n) for n in range(20)], timeout=60)[-1] == list(range(20))
    os.killpg(os.getpgid(doomed.pid), signal.SIGKILL)
    try:
        rebuilt = ray.get(tally.add.remote(20), timeout=120)
    except GetTimeoutError:
        pytest.fail(_why_not_done(cluster["url"], tally._actor_id, doomed))
    assert rebuilt == list(range(21))  # state rebuilt
    events = asyncio.run(
        fetch_rows(
            cluster["url"],
            "SELECT event_type, node_id, payload FROM events WHERE entity_id = $1 "
            "AND event_type IN ('replaying', 'restarting') ORDER BY position",
            tally._actor_id,
        )
    )
    assert [e["event_type"] for e in events] == ["restarting", "replaying"]
    assert events[1]["node_id"] != doomed_id
    ray.kill(tally)


@ray.remote(num_cpus=1)
def chain_start(n: int) -> np.ndarray:
    return np.full(10 * 1024 * 1024 // 8, n, dtype=np.int64)


@ray.remote(num_cpus=1)
def chain_step(previous: np.ndarray, k: int) -> np.ndarray:
    return previous + k


def test_outputs_lost_with_their_node_are_rebuilt_from_the_log(cluster: dict[str, str]) -> None:
    """A chain of 20 tasks with 10 MB outputs runs on a node of its own; its last output
    stays there (Ray's model: not copied until wanted). The node is killed: ``get``
    returns the right value, rebuilt by replaying the chain's lineage from the log.
    (It adds the node it kills, so the cluster keeps its shape.)"""
    url = cluster["url"]
    doomed, doomed_id = _add_node()
    there = NodeAffinitySchedulingStrategy(doomed_id, soft=True)
    ref = chain_start.options(scheduling_strategy=there).remote(0)
    for k in range(1, 20):
        ref = chain_step.options(scheduling_strategy=there).remote(ref, k)
    assert ray.wait([ref], timeout=120)[0] == [ref]
    made = asyncio.run(
        fetch_rows(url, "SELECT node_id, event_type FROM events WHERE entity_id = $1", ref.hex())
    )
    assert [(r["node_id"], r["event_type"]) for r in made] == [(doomed_id, "created")]

    os.killpg(os.getpgid(doomed.pid), signal.SIGKILL)
    value = ray.get(ref, timeout=180)
    assert value.shape == (10 * 1024 * 1024 // 8,) and int(value[0]) == int(value[-1]) == 190
    rebuilt = asyncio.run(
        fetch_rows(
            url,
            "SELECT entity_id, payload->>'object_id' AS object_id FROM events "
            "WHERE event_type = 'reconstructing' ORDER BY position",
        )
    )
    assert rebuilt[0]["entity_id"] == ref.task_id().hex() and rebuilt[0]["object_id"] == ref.hex()
    assert len({r["entity_id"] for r in rebuilt}) == len(rebuilt) == 20  # all of it, once
    ran = asyncio.run(
        fetch_rows(
            url,
            "SELECT node_id FROM events WHERE entity_id = $1 AND event_type = 'running' "
            "ORDER BY position",
            ref.task_id().hex(),
        )
    )
    assert ran[0]["node_id"] == doomed_id and ran[-1]["node_id"] != doomed_id


def test_tasks_of_a_killed_node_run_again_elsewhere(cluster: dict[str, str]) -> None:
    """(Last: it kills one of the cluster's nodes.)"""
    url = cluster["url"]
    ref = slow_on_two.remote(4.0)
    placed_on = None
    deadline = time.monotonic() + 60
    while placed_on is None and time.monotonic() < deadline:
        rows = asyncio.run(
            fetch_rows(
                url,
                "SELECT node_id AS node FROM events "
                "WHERE entity_id = $1 AND event_type = 'running'",
                ref.task_id().hex(),
            )
        )
        placed_on = rows[0]["node"] if rows else None
        time.sleep(0.05)
    assert placed_on is not None
    (victim,) = [
        n
        for n in local_node.local_nodes()
        if (n.session_dir / "node.ready").read_text() == placed_on
    ]
    os.killpg(os.getpgid(victim.pid), signal.SIGKILL)
    survivor = ray.get(ref, timeout=120)
    assert survivor not in (placed_on, cluster["head"])
    reasons = asyncio.run(
        fetch_rows(
            url,
            "SELECT payload->>'reason' AS reason FROM events "
            "WHERE entity_id = $1 AND event_type = 'retried'",
            ref.task_id().hex(),
        )
    )
    assert [r["reason"] for r in reasons] == [f"node {placed_on}, where it ran, died"]
