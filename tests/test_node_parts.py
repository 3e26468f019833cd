"""The node daemon's parts on their own, without a daemon: each with the real things it
drives (PostgreSQL for the event recorder, processes for the worker pool)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from log_rows import fetch_rows

from controlplane.eventlog import EntityKind, Event, RecordedEvent
from controlplane.node import rpc
from controlplane.node.actor_names import ActorNames
from controlplane.node.actors import ActorDirector
from controlplane.node.actors_elsewhere import ActorsElsewhere
from controlplane.node.cluster_link import _LOAD_KEYS, ClusterLink, JoinOffer
from controlplane.node.local_scheduler import LocalScheduler
from controlplane.node.object_store import ObjectStore
from controlplane.node.placement_groups import PlacementGroups
from controlplane.node.reconstruction import Reconstructor
from controlplane.node.recorder import EventRecorder
from controlplane.node.resources import ResourcePool
from controlplane.node.runtime_envs import RuntimeEnvs
from controlplane.node.spilled_tasks import SpilledTasks
from controlplane.node.task_runs import TaskRuns
from controlplane.node.task_table import TaskRecord, TaskTable
from controlplane.node.worker_output import WorkerOutput
from controlplane.node.workers import WorkerPool
from dataplane import protocol as p
from dataplane import shm
from dataplane.arena import region_name
from dataplane.object_table import Elsewhere, ObjectTable
from dataplane.serialization import serialize
from dataplane.spilling import BECOMING_READY_WAIT_S, Spiller
from dataplane.store_memory import StoreMemory
from dataplane.transfer import (
    CHUNK_SIZE,
    LinkError,
    Puller,
    Refused,
    TransferError,
    object_service,
)

pytestmark = pytest.mark.timeout(60)


def _job(name: str) -> Event:
    return Event(EntityKind.JOB, name, "submitted", {"entrypoint": name})


async def test_the_recorder_commits_written_behind_events_before_a_durable_one(
    gcs_url: str,
) -> None:
    recorder = EventRecorder(gcs_url, writer_node=None)
    await recorder.start()
    try:
        recorder.log([_job("behind 1"), _job("behind 2")])
        positions = await recorder.log_durable([_job("durable")])
        # what was written behind is in the log once the durable event is, and before it
        rows = await fetch_rows(gcs_url, "SELECT position, entity_id FROM events ORDER BY 1")
        assert [r["entity_id"] for r in rows] == ["behind 1", "behind 2", "durable"]
        assert positions == [rows[-1]["position"]]
        recorder.log([_job("last")])
    finally:
        await recorder.close()  # commits what is queued
    rows = await fetch_rows(gcs_url, "SELECT entity_id FROM events ORDER BY position")
    assert [r["entity_id"] for r in rows][-1] == "last"
    recorder.log([_job("after close")])  # dropped quietly: the daemon is shutting down
    with pytest.raises(Exception, match="closed"):
        await recorder.log_durable([_job("after close")])


class _Conn:
    """What the pool keeps of a worker's connection (the daemon's Connection)."""

    def __init__(self, worker_id: str | None, role: str = "worker") -> None:
        self.worker_id, self.role = worker_id, role


def _pool(node_id: str, size: int, logs: Path) -> WorkerPool:
    """A pool whose workers' output goes to files under ``logs`` (read by nobody)."""
    output = WorkerOutput(
        node_id,
        "",
        logs,
        ip=lambda: "127.0.0.1",
        address_of=lambda _node: None,
        peers=list,
        call=cast(Any, None),
    )
    return WorkerPool(node_id, "/nonexistent/node.sock", size=size, output=output)


def _envs(recorder: EventRecorder, cache: Path) -> RuntimeEnvs:
    """Runtime envs that nothing here asks for."""
    return RuntimeEnvs("node", "", cache, recorder, spawn=lambda _c: None, on_change=lambda: None)


async def test_the_worker_pool_hands_out_idle_workers_and_reaps_dead_ones(
    tmp_path: Path,
) -> None:
    # no daemon listens there: the workers cannot connect, and the pool does not care
    pool = _pool("node", 2, tmp_path)
    try:
        pool.fill()
        first, second = list(pool)
        assert len(pool) == 2 and not pool.has_idle()
        with pytest.raises(p.ProtocolError, match="unknown worker"):
            pool.connected("someone-else", cast(Any, _Conn("someone-else")))
        pool.connected(first.worker_id, cast(Any, _Conn(first.worker_id)))
        assert pool.of(cast(Any, _Conn(first.worker_id))) is first
        assert pool.of(cast(Any, _Conn(first.worker_id, role="driver"))) is None
        task = cast(Any, object())
        assert pool.run(task) is first and first.task is task and not pool.has_idle()
        assert pool.running_tasks() == 1
        assert pool.first_use(first, "f") and not pool.first_use(first, "f")
        pool.grow()  # full: 2 pool workers, none blocked
        assert len(pool) == 2
        pool.set_blocked(first, True)  # its task waits in get(): one more may start
        pool.grow()
        assert len(pool) == 3
        assert pool.task_over(first) is task and pool.running_tasks() == 0
        pool.idle_again(first)
        assert pool.has_idle()
        actor = pool.start(actor_id="actor")
        pool.connected(actor.worker_id, cast(Any, _Conn(actor.worker_id)))
        assert pool.run(task) is first  # an actor's worker is never idle in the pool
        grown = list(pool)[2]  # the one started while first was blocked
        pool.connected(grown.worker_id, cast(Any, _Conn(grown.worker_id)))
        assert pool.retire_idle(0.0) == []  # 3 pool workers: 2, and 1 for the blocked
        pool.set_blocked(first, False)  # its get() returned: one pool worker too many
        assert pool.retire_idle(3600.0) == []  # (none idle that long)
        assert pool.retire_idle(0.0) == [grown]  # the idle one (not the actor's)
        assert grown.retiring and not pool.has_idle()
        assert pool.retire_idle(0.0) == []  # back to its size
        second.process.send_signal(signal.SIGKILL)  # before it said hello
        for _ in range(500):
            if second in pool.exited_unconnected():
                break
            await asyncio.sleep(0.01)
        ended = pool.exited_unconnected()
        assert second in ended and first not in ended and actor not in ended
        gone = await pool.gone(second.worker_id)
        assert gone is not None and gone[0] is second and gone[1] != 0
        assert not pool.alive(second.worker_id) and await pool.gone(second.worker_id) is None
    finally:
        await pool.stop()
    assert len(pool) == 0
    for handle in (first, second, actor):
        assert handle.process.poll() is not None  # every process killed and reaped


async def test_the_spiller_spills_the_oldest_objects_and_restores_them_checked(
    tmp_path: Path,
) -> None:
    """A full store spills its oldest unpinned objects to disk and says so; an object
    waited for comes back, checked against its checksum; a damaged copy is reported
    lost; a spill directory that cannot be written is named in the store-full error."""
    prefix = f"parts-{uuid.uuid4().hex}"
    records: list[tuple[str, str]] = []
    lost: list[str] = []
    tasks: set[asyncio.Task[None]] = set()
    objects = ObjectTable(3 * MB, on_free=lambda _location: None)
    memory = StoreMemory(prefix, objects)
    spiller = _spiller(tmp_path, memory, records, tasks, lost)
    objects._on_wanted = lambda object_id, where: spiller.restore(object_id, where)
    try:
        sizes = [_store(memory, name) for name in ("a", "b", "c")]  # ~1 MB each
        # more than the room left and one object make: the two oldest go to disk
        needed = objects.capacity - objects.used + sizes[0] + 1
        room = await spiller.make_room(needed)
        assert room is not None
        memory.give_back(*room, needed)  # (room for a new object: given back here)
        assert sorted(records) == [("spilled", "a"), ("spilled", "b")]  # (copied at once)
        assert objects.state("a") == objects.state("b") == "spilled"
        assert objects.state("c") == "stored"
        ready = asyncio.Event()
        objects.on_ready("a", ready.set)  # waited for: restored
        await asyncio.wait_for(ready.wait(), 10)
        assert records[-1] == ("restored", "a") and objects.state("a") == "stored"
        assert not (tmp_path / "spill" / "a").exists()  # the copy is gone once restored
        (tmp_path / "spill" / "b").write_bytes(b"x" * MB)  # damaged on disk
        objects.on_ready("b", lambda: None)
        await asyncio.gather(*tasks)
        assert lost == ["b"]
        spiller.spill_dir = tmp_path / "a-file"
        spiller.spill_dir.write_text("not a directory")
        _store(memory, "d")
        needed = objects.capacity - objects.used + 1  # an object must go: d cannot
        assert await spiller.make_room(needed) is None
        assert f"spilling to {spiller.spill_dir} failed" in spiller.store_full(needed)
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
        _forget(prefix)


async def test_two_reservations_at_once_never_spill_the_same_object_twice(
    tmp_path: Path,
) -> None:
    """Two writers that need room at the same moment: each spill picks objects the
    other did not, so no object is copied twice -- the second copy, finding the object
    spilled already, would delete the file the first one made, its only copy."""
    prefix = f"parts-{uuid.uuid4().hex}"
    records: list[tuple[str, str]] = []
    tasks: set[asyncio.Task[None]] = set()
    objects = ObjectTable(3 * MB, on_free=lambda _location: None)
    memory = StoreMemory(prefix, objects)
    spiller = _spiller(tmp_path, memory, records, tasks, [])
    try:
        sizes = {name: _store(memory, name) for name in ("a", "b", "c")}
        size = max(sizes.values())
        room = await asyncio.gather(spiller.make_room(size), spiller.make_room(size))
        assert None not in room and room[0] != room[1]
        assert sorted(records) == [("spilled", "a"), ("spilled", "b")]  # each once
        for name in ("a", "b"):  # and each copy is there, whole
            assert (tmp_path / "spill" / name).stat().st_size == sizes[name]
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
        _forget(prefix)


async def test_a_full_store_waits_for_puts_whose_events_are_on_their_way(
    tmp_path: Path,
) -> None:
    """The store is full of one value being read (pinned) and puts whose `created`
    events are not durable yet: a reservation waits until they are ready, then spills
    them, rather than say the store is full (it did, on a VM whose log's commits lagged
    the puts); with only pinned values in it, it is refused at once."""
    prefix = f"parts-{uuid.uuid4().hex}"
    records: list[tuple[str, str]] = []
    tasks: set[asyncio.Task[None]] = set()
    objects = ObjectTable(3 * MB, on_free=lambda _location: None)
    memory = StoreMemory(prefix, objects)
    spiller = _spiller(tmp_path, memory, records, tasks, [])
    try:
        size = _store(memory, "r")
        objects.pin("r")  # (a reader's view)
        made = {name: _write(memory, name) for name in ("b", "c")}
        for name, location in made.items():  # put: events on their way to the log
            objects.expect(name, location)
            objects.hold(name)
        assert not objects.spill_candidates(size, set(), partial=True)
        reserving = asyncio.ensure_future(spiller.make_room(size))
        await asyncio.sleep(0.2)
        assert not reserving.done()
        objects.ready(made["b"])  # (its event durable)
        room = await asyncio.wait_for(reserving, 10)
        assert room is not None and records == [("spilled", "b")]
        memory.give_back(*room, size)
        objects.ready(made["c"])
        objects.pin("c")
        need = objects.capacity - objects.used + 1  # only pinned values are left to spill
        # nothing on its way: refused at once, not after BECOMING_READY_WAIT_S
        assert await asyncio.wait_for(spiller.make_room(need), BECOMING_READY_WAIT_S / 2) is None
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
        _forget(prefix)


def test_store_memory_takes_room_in_regions_it_makes_and_gives_it_back() -> None:
    """Room is charged to the store and placed in a region made when the ones there
    are full; a request that the store's accounting admits but no one range can hold
    (fragmented) is refused with nothing charged; room given back is whole again."""
    prefix = f"parts-{uuid.uuid4().hex}"
    objects = ObjectTable(4 * MB, on_free=lambda _location: None)
    memory = StoreMemory(prefix, objects, chunk=2 * MB)
    try:
        a, b = memory.take(MB), memory.take(MB)
        assert a is not None and b is not None and a[0] == b[0] == 0
        assert (shm.SHM_DIR / region_name(prefix, 0)).stat().st_size == 2 * MB
        c = memory.take(MB)
        assert c is not None and c[0] == 1  # region 0 is full: a second one
        assert (shm.SHM_DIR / region_name(prefix, 1)).exists()
        assert objects.used == 3 * MB and memory.take(2 * MB) is None  # over capacity
        memory.give_back(*a, MB)
        assert objects.used == 2 * MB
        # 2 MB are free, in two pieces: admitted by the accounting, placed nowhere
        assert memory.take(2 * MB) is None and objects.used == 2 * MB
        memory.give_back(*b, MB)
        whole = memory.take(2 * MB)
        assert whole == (0, 0) and objects.used == 3 * MB
    finally:
        _forget(prefix)


async def test_a_fragmented_store_spills_until_one_range_holds_the_object(
    tmp_path: Path,
) -> None:
    """Not full but fragmented: the oldest objects are spilled until a free range is
    large enough, and no more."""
    prefix = f"parts-{uuid.uuid4().hex}"
    records: list[tuple[str, str]] = []
    tasks: set[asyncio.Task[None]] = set()
    objects = ObjectTable(4 * MB, on_free=lambda _location: None)
    memory = StoreMemory(prefix, objects, chunk=2 * MB)
    spiller = _spiller(tmp_path, memory, records, tasks, [])
    try:
        sizes = [_store(memory, name) for name in ("x", "y", "z")]  # x, y in region 0
        room = await spiller.make_room(2 * MB - 4096)  # fits in the store, in no range
        assert room is not None and room[0] == 0  # where x and y were
        assert sorted(records) == [("spilled", "x"), ("spilled", "y")]
        assert objects.state("z") == "stored" and objects.used == sizes[2] + 2 * MB - 4096
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
        _forget(prefix)


def _spiller(
    tmp_path: Path,
    memory: StoreMemory,
    records: list[tuple[str, str]],
    tasks: set[asyncio.Task[None]],
    lost: list[str],
) -> Spiller:
    """A spiller into ``tmp_path/spill`` that notes its events (``records``: (event,
    object id)), the tasks it spawns and the objects it reports lost."""
    return Spiller(
        memory.prefix,
        tmp_path / "spill",
        memory.objects,
        memory,
        spawn=lambda coroutine: tasks.add(asyncio.get_running_loop().create_task(coroutine)),
        record=lambda object_id, event, _payload: records.append((event, object_id)),
        on_lost=lambda object_id, _why: lost.append(object_id),
        on_restored=lambda: None,
    )


MB = 1024 * 1024


def _write(
    memory: StoreMemory, object_id: str, array: np.ndarray | None = None
) -> p.ObjectLocation:
    """An object's bytes written into room taken in the store (~1 MB by default)."""
    value = serialize(
        np.full(MB // 8 - 64, ord(object_id), dtype=np.int64) if array is None else array
    )
    room = memory.take(value.total_size)
    assert room is not None
    location = p.ObjectLocation(object_id, region=room[0], offset=room[1], size=value.total_size)
    shm.write_object(memory.prefix, location, value)
    return location


def _store(memory: StoreMemory, object_id: str) -> int:
    """An object in the store, held and ready; its size."""
    location = _write(memory, object_id)
    memory.objects.expect(object_id)
    memory.objects.hold(object_id)
    memory.objects.ready(location)
    return location.size


def _forget(*prefixes: str) -> None:
    """The test's stores go: their regions, and this process's mappings of them."""
    for prefix in prefixes:
        shm.unlink_all(prefix)
        shm.forget(prefix)


class _InProcessLink:
    """A NodeLink whose calls reach another node's object service in this process (the
    network is gRPC's, tested end to end elsewhere); a refusal is a LinkError."""

    def __init__(self, services: dict[str, Any]) -> None:
        self._services = services

    def unary(self, address: str, method: str) -> Any:
        return self._call(address, method)

    def raw(self, address: str, method: str) -> Any:
        return self._call(address, method)

    def _call(self, address: str, method: str) -> Any:
        async def call(request: dict[str, Any], *, timeout: float | None = None) -> Any:
            try:
                return await self._services[address][method](request)
            except Refused as refused:
                raise LinkError(refused.code, refused.details) from None

        return call


async def test_a_pull_copies_an_object_chunk_by_chunk_and_checks_it() -> None:
    prefix_a, prefix_b, prefix_c = (f"parts-{uuid.uuid4().hex}" for _ in range(3))
    here = StoreMemory(prefix_a, ObjectTable(64 * MB, on_free=lambda _location: None))
    there = StoreMemory(prefix_b, ObjectTable(64 * MB, on_free=lambda _location: None))
    info, read = object_service(there, {"big": "job-7"}.get)
    released: list[str] = []
    jobs: list[tuple[str, str]] = []

    async def release(request: dict[str, Any]) -> dict[str, Any]:
        released.append(request["object_id"])
        return {}

    link = _InProcessLink({"b": {"ObjectInfo": info, "ReadObject": read, "Release": release}})
    puller = Puller(prefix_a, here, link, on_job=lambda o, j: jobs.append((o, j)))
    try:
        big = _write(there, "big", np.arange(3 * CHUNK_SIZE // 8 + 5, dtype=np.int64))
        there.objects.expect("big")
        there.objects.hold("big")
        there.objects.ready(big)  # 4 chunks
        pulled = await puller.pull("b", "big")
        assert pulled.region is not None and pulled.size == big.size
        assert bytes(shm.object_view(prefix_a, pulled)) == bytes(shm.object_view(prefix_b, big))
        assert here.objects.used == big.size  # charged to this node's store
        assert jobs == [("big", "job-7")]  # (its node named its job: its events will)
        with pytest.raises(TransferError, match="no longer has object gone"):
            await puller.pull("b", "gone")
        assert jobs == [("big", "job-7")]
        damaged = shm.object_view(prefix_b, big, writable=True)
        damaged[big.size - 10 :] = b"\xff" * 10  # damaged where it lies
        damaged.release()
        with pytest.raises(TransferError, match="do not match their checksum"):
            await Puller(prefix_c, StoreMemory(prefix_c, here.objects), link).pull("b", "big")
        assert here.objects.used == big.size  # the failed pull's room was given back
        with pytest.raises(Refused, match="bad chunk range"):
            await read({"object_id": "big", "offset": 0, "length": CHUNK_SIZE + 1})
        await puller.release("b", "big")
        assert released == ["big"]
    finally:
        _forget(prefix_a, prefix_b, prefix_c)


class _Owner:
    """A driver's connection as the placement groups and the store see it: answers
    are collected."""

    def __init__(self) -> None:
        self.sent: list[object] = []
        self.reserved: dict[tuple[int, int], int] = {}
        self.closed = False

    def send(self, message: object) -> None:
        self.sent.append(message)


async def test_placement_groups_reserve_lend_and_give_back_their_bundles(gcs_url: str) -> None:
    recorder = EventRecorder(gcs_url, writer_node=None)
    await recorder.start()
    resources = ResourcePool({"CPU": 4.0})
    objects = ObjectTable(MB, on_free=lambda _location: None)
    published: list[tuple[list[p.ObjectLocation], list[str]]] = []
    schedules: list[None] = []

    def publish(locations: list[p.ObjectLocation], events: list[Event], _owner: Any) -> None:
        published.append((locations, [e.event_type for e in events]))

    groups = _placement_groups(
        resources, objects, recorder, publish, schedule=lambda: schedules.append(None)
    )
    owner = cast(Any, _Owner())
    try:
        msg = p.CreatePlacementGroup("pg", [{"CPU": 1.0}, {"CPU": 2.0}], "PACK", "g", "job", "r")
        groups.create(owner, msg)
        assert schedules  # a pending group: the scheduler reserves it on its next pass
        groups.reserve()
        assert resources.available["CPU"] == 1.0  # both bundles taken out of the node
        ((ready,), events) = published[0]  # the ready object: True, inline
        assert ready.object_id == "r" and ready.inline is not None and ready.error is None
        assert events == ["ready", "created"] and objects.used == ready.size
        spec = p.TaskSpec(
            "t",
            "job",
            "f",
            "",
            [],
            {},
            1,
            {"CPU": 2.0},
            0,
            False,
            strategy=("PLACEMENT_GROUP", "pg", -1, ""),
        )
        record = cast(Any, TaskRecord(spec, None))
        bundle, never = groups.bundle_for(record)
        assert never is None and bundle is not None and bundle.request == {"CPU": 2.0}
        assert not groups.bundle_elsewhere(record)
        gpu_ids = groups.take(bundle, spec.resources)
        too_big = TaskRecord(dataclasses.replace(spec, resources={"CPU": 3.0}), None)
        assert groups.bundle_for(cast(Any, too_big))[1] is not None  # never fits a bundle
        table = _answer(groups, owner, p.PlacementGroupTable(1))
        assert table["pg"]["state"] == "CREATED" and table["pg"]["strategy"] == "PACK"
        groups.remove("pg")  # a task still runs in it: its resources stay taken
        assert resources.available["CPU"] == 1.0
        assert (
            groups.bundle_for(record)[1]
            == "its placement group pg was removed (or never existed here)"
        )
        groups.give_back(bundle, spec.resources, gpu_ids)  # the last one: all back
        assert resources.available["CPU"] == 4.0
        groups.create(owner, dataclasses.replace(msg, pg_id="pg2", ready_object_id="r2"))
        groups.owner_gone(owner)  # not detached: removed with its job, never ready
        assert published[-1][1] == ["removed"] and published[-1][0][0].error is not None
    finally:
        await recorder.close()
    rows = await fetch_rows(gcs_url, "SELECT entity_id, event_type FROM events ORDER BY position")
    assert [(r["entity_id"], r["event_type"]) for r in rows] == [
        ("pg", "created"),
        ("pg", "removed"),
        ("pg2", "created"),
    ]


def _placement_groups(
    resources: ResourcePool,
    objects: ObjectTable,
    recorder: EventRecorder,
    publish: Callable[[list[p.ObjectLocation], list[Event], Any], None],
    schedule: Callable[[], None],
) -> PlacementGroups:
    """The placement groups of a node alone (not in a cluster)."""
    return PlacementGroups(
        "node",
        resources,
        objects,
        recorder,
        in_cluster=lambda: False,
        publish=publish,
        created_event=lambda loc, _task, job: Event(
            EntityKind.OBJECT, loc.object_id, "created", {}, job_id=job
        ),
        schedule=schedule,
    )


def _answer(groups: PlacementGroups, owner: Any, msg: p.PlacementGroupTable) -> Any:
    groups.table(owner, msg)
    reply = owner.sent.pop()
    assert isinstance(reply, p.Reply)
    return reply.value


class _Tasks:
    """The node's tasks as the reconstructor sees them (reconstruction.TaskRunner):
    records what it is asked to run."""

    def __init__(self) -> None:
        self.rebuilt: list[tuple[str, int]] = []
        self.run: list[str] = []

    def has_task(self, task_id: str) -> bool:
        return False

    def knows_function(self, function_id: str) -> bool:
        return True

    def add_rebuild(self, spec: p.TaskSpec, attempt: int) -> Any:
        self.rebuilt.append((spec.task_id, attempt))
        return TaskRecord(spec, None, attempt=attempt)

    def run_when_ready(self, record: Any) -> None:
        self.run.append(record.spec.task_id)

    def next_attempt(self, record: Any, reason: str) -> None:
        record.attempt += 1

    def schedule(self) -> None:
        pass


async def test_the_reconstructor_reruns_lineage_from_the_log_and_recovers_puts(
    gcs_url: str, tmp_path: Path
) -> None:
    """A lost return is rebuilt by re-running its task, read back from its ``submitted``
    event (attempt counted from the log); a lost small put comes back from its
    ``created`` event; a task with max_retries=0 is not re-run: its object is lost."""
    recorder = EventRecorder(gcs_url, writer_node=None)
    await recorder.start()
    objects = ObjectTable(MB, on_free=lambda _location: None)
    tasks = _Tasks()
    spawned: set[asyncio.Task[None]] = set()
    spiller = Spiller(
        "node",
        tmp_path,
        objects,
        StoreMemory("node", objects),
        spawn=lambda c: spawned.add(asyncio.get_running_loop().create_task(c)),
        record=lambda *_: None,
        on_lost=lambda *_: None,
        on_restored=lambda: None,
    )
    rebuilder = Reconstructor(
        "node",
        gcs_url,
        objects,
        recorder,
        spiller,
        tasks,
        spawn=lambda c: spawned.add(asyncio.get_running_loop().create_task(c)),
    )
    spec = p.TaskSpec("t1", "job", "square", "f", [], {}, 1, {"CPU": 1.0}, 3, False)
    once = dataclasses.replace(spec, task_id="t2", max_retries=0)
    put_id, put_value = "p" * 24 + "00000000", b"a small put"
    for each in (spec, once):
        submitted = Event(
            EntityKind.TASK, each.task_id, "submitted", {"name": each.name}, data=p.encode(each)
        )
        recorder.log([submitted])
    await recorder.log_durable(  # (and what was written behind before)
        [
            Event(EntityKind.TASK, "t1", "finished", {"attempt": 0}),
            Event(EntityKind.OBJECT, put_id, "created", {"size_bytes": 11}, data=put_value),
        ]
    )
    try:
        for object_id in (spec.return_ids()[0], once.return_ids()[0], put_id):
            objects.expect(object_id)
            objects.hold(object_id)
            objects.ready(p.ObjectLocation(object_id, inline=b"x", size=1))
            rebuilder.object_lost(object_id, "its node died")
        await asyncio.gather(*spawned)
        assert tasks.rebuilt == [("t1", 1)] and tasks.run == ["t1"]
        assert objects.state(spec.return_ids()[0]) == "pending"  # waits for the re-run
        assert objects.location(once.return_ids()[0]).error is not None
        assert "max_retries=0" in str(objects.location(once.return_ids()[0]).error)
        assert objects.location(put_id).inline == put_value
    finally:
        await recorder.close()
    rows = await fetch_rows(
        gcs_url,
        "SELECT entity_id, event_type FROM events WHERE event_type IN "
        "('lost', 'reconstructing', 'restored') ORDER BY position",
    )
    assert sorted((r["entity_id"], r["event_type"]) for r in rows) == sorted(
        [
            (spec.return_ids()[0], "lost"),
            (once.return_ids()[0], "lost"),
            (put_id, "lost"),
            ("t1", "reconstructing"),
            (put_id, "restored"),
        ]
    )


async def test_the_cluster_link_serves_joins_and_keeps_the_membership(gcs_url: str) -> None:
    """A head's link answers Join over its gRPC service (the token checked), hands the
    GCS replica's plan only to the planned host, and keeps who is alive and dead from
    the nodes' events."""
    recorder = EventRecorder(gcs_url, writer_node=None)
    await recorder.start()
    token = "parts-" + uuid.uuid4().hex
    background: set[asyncio.Task[None]] = set()

    def spawn(coroutine: Any, *, vital: bool = False) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        background.add(task)
        return task

    plan = [{"host": "192.0.2.11", "port": 5432}]  # (one per server of the log)
    link = ClusterLink(
        "head",
        gcs_url,
        "127.0.0.1",
        0,
        recorder,
        auth_token=token,
        tls=None,
        join_offer=JoinOffer("postgresql://cairn_runtime@head/cairn", False, plan),
        membership_monitor=False,
        spawn=spawn,
        on_fenced=lambda: None,
    )
    load = {"available": {"CPU": 1.0}, **{key: 0 for key in _LOAD_KEYS}}
    try:
        assert all(head >= 0 for head in await link.join({}, {}, lambda: load))
        address = link.address

        def join(request: dict[str, Any], with_token: str | None = token) -> dict[str, Any]:
            return rpc.call(address, "Join", request, 5, with_token)

        answer = await asyncio.to_thread(join, {"hosts": ["192.0.2.11"], "gcs_replica": True})
        assert answer["gcs_url"].startswith("postgresql://") and answer["gcs_replica"] == plan
        elsewhere = await asyncio.to_thread(join, {"hosts": ["192.0.2.12"], "gcs_replica": True})
        assert "gcs_replica" not in elsewhere
        assert "plans its GCS replica on 192.0.2.11" in elsewhere["gcs_replica_refused"]
        with pytest.raises(rpc.AuthError):
            await asyncio.to_thread(join, {}, "wrong-token")
        assert not link.has_peers()
        registered = _node_event("b", "registered", {"address": "192.0.2.12:1"})
        assert not link.node_event(registered)
        assert link.has_peers() and link.address_of("b") == "192.0.2.12:1"
        assert link.node_event(_node_event("b", "dead", {"cause": "test"}))
        assert not link.has_peers() and link.is_dead_peer("b")
    finally:
        await link.leave(Event(EntityKind.NODE, "head", "dead", {"cause": "shutdown"}))
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await recorder.close()
        rpc.use_token(None)
        rpc.use_node_id(None)
    refused = await fetch_rows(
        gcs_url, "SELECT payload->>'method' AS m FROM events WHERE event_type = 'auth_refused'"
    )
    assert [r["m"] for r in refused] == ["/cairn.Node/Join"]


def _node_event(node_id: str, event_type: str, payload: dict[str, Any]) -> RecordedEvent:
    return RecordedEvent(
        position=1,
        event_id=uuid.uuid4(),
        recorded_at=datetime.now(UTC),
        job_id=None,
        entity_kind=EntityKind.NODE,
        entity_id=node_id,
        event_type=event_type,
        node_id=node_id,
        payload=payload,
        data=None,
    )


async def test_the_object_store_makes_objects_ready_only_once_their_events_are_durable(
    gcs_url: str, tmp_path: Path
) -> None:
    """A small put is in the log with its value; a durable one is copied to disk and
    its event names the copy; either is ready only once its ``created`` event commits.
    A reservation that does not fit spills an older object first."""
    recorder = EventRecorder(gcs_url, writer_node=None)
    await recorder.start()
    prefix = f"parts-{uuid.uuid4().hex}"
    spawned: set[asyncio.Task[None]] = set()
    schedules: list[None] = []
    store = ObjectStore(
        prefix,
        3 * MB,
        tmp_path / "spill",
        tmp_path / "durable",
        recorder,
        spawn=lambda c: spawned.add(asyncio.get_running_loop().create_task(c)),
        schedule=lambda: schedules.append(None),
        fetch_remote=lambda *_: None,
        release_remote=lambda *_: None,
        on_lost=lambda *_: None,
    )
    owner = cast(Any, _Owner())
    try:
        small = p.ObjectLocation("small" + "0" * 27, inline=b"value", size=5)
        store.objects.expect(small.object_id)
        store.objects.hold(small.object_id)
        store.put(small, None, "job", durable=False)
        assert store.objects.state(small.object_id) == "pending"  # its event is on its way
        ready = asyncio.Event()
        store.objects.on_ready(small.object_id, ready.set)
        await asyncio.wait_for(ready.wait(), 10)
        location = _write(store.memory, "b")  # (~1 MB, as its writer wrote it)
        store.objects.hold("b")
        store.put(location, None, "job", durable=True)
        durable = asyncio.Event()
        store.objects.on_ready("b", durable.set)
        await asyncio.wait_for(durable.wait(), 10)
        assert (tmp_path / "durable" / "b").read_bytes() == bytes(shm.object_view(prefix, location))
        store.reserve(owner, 7, 3 * MB - 1000)  # only fits once "b" is spilled
        await asyncio.gather(*spawned)
        reply = owner.sent.pop()
        assert isinstance(reply, p.Reply) and reply.request_id == 7 and reply.error is None
        assert store.objects.state("b") == "spilled"
        store.reserve(owner, 8, 4 * MB)  # more than the store: refused, saying why
        reply = owner.sent.pop()
        assert reply.error is not None and "store_full" in reply.error
        assert schedules  # objects became ready: the scheduler was told
    finally:
        await asyncio.gather(*spawned, return_exceptions=True)
        await recorder.close()
        _forget(prefix)
    rows = await fetch_rows(
        gcs_url,
        "SELECT entity_id, event_type, data, payload->>'durable_path' AS durable "
        "FROM events ORDER BY position",
    )
    events = [(r["entity_id"], r["event_type"]) for r in rows]
    assert events == [(small.object_id, "created"), ("b", "created"), ("b", "spilled")]
    assert rows[0]["data"] == b"value" and rows[1]["durable"] == str(tmp_path / "durable" / "b")


async def test_an_object_made_elsewhere_names_the_job_the_store_was_told(
    gcs_url: str, tmp_path: Path
) -> None:
    """A value of a task this node spilled was made on another node: the store is told
    its job (remote_tasks.py), and what this node says of it names that job, though
    nothing of it may be in this node's server of the log to look the job up in (here:
    nothing at all). An object it was told nothing of names none."""
    recorder = EventRecorder(gcs_url, writer_node=None)
    await recorder.start()
    prefix = f"parts-{uuid.uuid4().hex}"
    store = ObjectStore(
        prefix,
        MB,
        tmp_path / "spill",
        tmp_path / "durable",
        recorder,
        spawn=lambda c: asyncio.get_running_loop().create_task(c),
        schedule=lambda: None,
        fetch_remote=lambda *_: None,
        release_remote=lambda *_: None,
        on_lost=lambda *_: None,
    )
    told, untold = "told" + "0" * 28, "untold" + "0" * 26
    try:
        store.remember_job(told, "job-of-the-spilled-task")
        assert store.job_of(told) == "job-of-the-spilled-task"
        for object_id in (told, untold):
            store.objects.expect(object_id)
            store.objects.hold(object_id)
            store.objects.ready(p.ObjectLocation(object_id, inline=b"v", size=1))
            store.objects.release(object_id)  # freed: its `freed` event
    finally:
        await recorder.close()
        _forget(prefix)
    rows = await fetch_rows(
        gcs_url, "SELECT entity_id, event_type, job_id FROM events ORDER BY position"
    )
    assert [(r["entity_id"], r["event_type"], r["job_id"]) for r in rows] == [
        (told, "freed", "job-of-the-spilled-task"),
        (untold, "freed", None),
    ]
    assert store.job_of(told) is None  # (forgotten once freed)


def test_a_value_left_on_another_node_and_dropped_unfetched_is_forgotten(
    tmp_path: Path,
) -> None:
    """A value of a task this node spilled, left on the node that made it and dropped
    before anything here wanted it: that node is told to let its copy go, and the store
    forgets the value's job (no event of it is written here, so none would)."""
    released: list[tuple[str, str]] = []
    store = ObjectStore(
        f"parts-{uuid.uuid4().hex}",
        MB,
        tmp_path / "spill",
        tmp_path / "durable",
        cast(EventRecorder, None),  # (nothing here records an event)
        spawn=lambda c: None,
        schedule=lambda: None,
        fetch_remote=lambda *_: None,
        release_remote=lambda address, object_id: released.append((address, object_id)),
        on_lost=lambda *_: None,
    )
    left = "left" + "0" * 28
    store.remember_job(left, "job-of-the-spilled-task")
    store.objects.expect(left)
    store.objects.hold(left)
    location = p.ObjectLocation(left, size=MB, remote="10.0.0.2:7000")
    store.objects.set_elsewhere(left, Elsewhere("remote", "10.0.0.2:7000", location))
    store.objects.release(left)
    assert released == [("10.0.0.2:7000", left)]
    assert store.job_of(left) is None


class _Submitter:
    """A driver's connection as the task table sees it: the objects it holds."""

    def __init__(self) -> None:
        self.holding: set[str] = set()


async def test_the_task_table_logs_lineage_once_per_function_and_lets_arguments_go(
    gcs_url: str,
) -> None:
    """A submitted task holds its returns for its submitter and pins its arguments (it
    waits for those not ready); its ``submitted`` event carries the function's code the
    first time only; a retry is logged; once over, its arguments may be freed."""
    recorder = EventRecorder(gcs_url, writer_node=None)
    await recorder.start()
    freed: list[str] = []
    objects = ObjectTable(MB, on_free=lambda location: freed.append(location.object_id))
    table = TaskTable("n1", objects, recorder)
    driver = _Submitter()
    try:
        objects.hold("a")
        objects.ready(p.ObjectLocation("a", inline=b"1", size=1))
        objects.expect("b")
        table.add_function("f", b"code", "square")

        def spec(task_id: str, parent: str | None = None) -> p.TaskSpec:
            args = [p.Arg(ref="a"), p.Arg(ref="b")]
            return p.TaskSpec(
                task_id, "job", "square", "f", args, {}, 1, {"CPU": 1.0}, 2, False,
                parent_task_id=parent,
            )  # fmt: skip

        first = table.submit(cast(Any, driver), spec("t1"))
        second = table.submit(cast(Any, driver), spec("t2", parent="t1"))
        assert first.pending_deps == {"b"} and "t1" in table and table.waiting() == 0
        assert driver.holding == {*first.spec.return_ids(), *second.spec.return_ids()}
        assert table.making(second.spec.return_ids()[0]) is second
        assert table.children_of("t1") == [second]
        table.next_attempt(first, "worker died")
        assert first.attempt == 1 and first.retries_left == 2  # (an attempt that costs none)
        table.retry_attempt(first, "worker died")
        assert first.attempt == 2 and first.retries_left == 1
        first.retries_left = -1  # unlimited retries stay unlimited
        table.retry_attempt(second, "worker died")
        table.retry_attempt(first, "worker died")
        assert first.attempt == 3 and first.retries_left == -1
        assert second.attempt == 1 and second.retries_left == 1
        objects.release("a")  # the driver lets go: the tasks still pin it
        table.over(first)
        assert freed == [] and "t1" not in table
        table.over(second)
        assert freed == ["a"] and list(table) == []
    finally:
        await recorder.close()
    rows = await fetch_rows(
        gcs_url, "SELECT entity_id, event_type, data, payload FROM events ORDER BY position"
    )
    assert [(r["entity_id"], r["event_type"]) for r in rows] == [
        ("t1", "submitted"),
        ("t2", "submitted"),
        ("t1", "retried"),
        ("t1", "retried"),
        ("t2", "retried"),
        ("t1", "retried"),
    ]
    with_code = p.decode_frame(rows[0]["data"])
    assert isinstance(with_code, tuple) and with_code[1] == b"code"  # the first: its code
    assert isinstance(p.decode_frame(rows[1]["data"]), p.TaskSpec)  # then: the spec alone
    assert json.loads(rows[2]["payload"]) == {"attempt": 1, "reason": "worker died"}


class _Node:
    """The node (and the cluster, ``Spills``) as a pass of the local scheduler sees them:
    what it was asked, in order."""

    def __init__(self, spill_names: set[str]) -> None:
        self.spill_names = spill_names
        self.asked: list[tuple[str, str]] = []

    def before_pass(self) -> None:
        pass

    def must_spill(self, record: TaskRecord) -> bool:
        return record.spec.strategy == ("SPREAD",)

    def can_spill(self, record: TaskRecord) -> bool:
        return record.spec.name in self.spill_names

    def spill(self, record: TaskRecord) -> None:
        self.asked.append(("spill", record.spec.task_id))

    def fail(self, record: TaskRecord, error: p.ErrorInfo) -> None:
        self.asked.append(("fail", record.spec.task_id))

    def run(self, record: TaskRecord, handle: Any) -> None:
        record.worker = handle
        self.asked.append(("run", record.spec.task_id))

    def infeasible(self, record: TaskRecord, reason: str) -> None:
        self.asked.append(("infeasible", record.spec.task_id))


async def test_the_local_scheduler_runs_spills_and_lends_out_resources(
    gcs_url: str, tmp_path: Path
) -> None:
    """Ready tasks run while CPUs and idle workers last, one FIFO per resource shape (a
    shape that does not fit does not hold up another); what cannot run here goes to
    the global scheduler where allowed; a worker blocked in get() lends its CPU out."""
    recorder = EventRecorder(gcs_url, writer_node=None)
    await recorder.start()
    resources = ResourcePool({"CPU": 2.0})
    objects = ObjectTable(MB, on_free=lambda _location: None)
    workers = _pool("node", 2, tmp_path)
    node = _Node(spill_names={"wide"})
    groups = _placement_groups(resources, objects, recorder, lambda *_: None, lambda: None)
    scheduler = LocalScheduler(resources, groups, workers, node, node, _envs(recorder, tmp_path))

    def task(task_id: str, name: str, resources: dict[str, float], **more: Any) -> TaskRecord:
        spec = p.TaskSpec(task_id, "job", name, "f", [], {}, 1, resources, 0, False, **more)
        return TaskRecord(spec, None)

    try:
        workers.fill()
        for handle in list(workers):
            workers.connected(handle.worker_id, cast(Any, _Conn(handle.worker_id)))
        t1, t2, t3 = (task(f"t{i}", "narrow", {"CPU": 1.0}) for i in (1, 2, 3))
        for record in (t1, t2, t3):
            scheduler.enqueue(record)
        assert node.asked == [("run", "t1"), ("run", "t2")] and resources.available["CPU"] == 0
        assert t3.state == "QUEUED" and scheduler.pending() == 1
        scheduler.enqueue(task("t4", "wide", {"CPU": 1.0, "memory": 1.0}))  # another shape
        scheduler.enqueue(task("t5", "narrow", {"CPU": 0.5}, strategy=("SPREAD",)))
        assert node.asked[2:] == [("spill", "t4"), ("spill", "t5")]
        assert t1.worker is not None
        scheduler.block(t1.worker)  # t1 waits in get(): its CPU is lent out
        assert resources.available["CPU"] == 1.0 and len(workers) == 3  # a worker more
        assert scheduler.pending() == 1  # ... which t3 waits for until it connects
        grown = next(h for h in workers if h.conn is None)
        workers.connected(grown.worker_id, cast(Any, _Conn(grown.worker_id)))
        scheduler.schedule()
        assert node.asked[-1] == ("run", "t3") and scheduler.pending() == 0
        scheduler.unblock(t1.worker)  # taken back, even if the node is short meanwhile
        assert resources.available["CPU"] == -1.0
        for record in (t1, t2, t3):
            scheduler.give_back(record)
        assert resources.available["CPU"] == 2.0
        t6 = task("t6", "narrow", {"CPU": 4.0})  # more than the node has, and not spillable
        scheduler.enqueue(t6)
        scheduler.schedule()
        assert scheduler.pending() == 1  # it waits, reported once
        assert [a for a in node.asked if a[0] == "infeasible"] == [("infeasible", "t6")]
        scheduler.withdraw(t6)
        assert scheduler.pending() == 0
    finally:
        await workers.stop()
        await recorder.close()


def test_actor_names_are_taken_once_per_namespace_until_their_actor_dies() -> None:
    """A name is reserved before its actor exists, so a second claim is refused (or,
    with get_if_exists, answered with the holder once its creation is submitted, or
    reserved anew if it dies first); each job looks names up in its own namespace
    unless it names one; a dead actor's names are free again."""
    asyncio.run(_actor_names())


async def _actor_names() -> None:
    names = ActorNames()
    names.job_started("job1", "ns1")
    names.job_started("job2", "ns2")
    driver = _Owner()

    def answer() -> p.Reply:
        reply = driver.sent.pop()
        assert isinstance(reply, p.Reply)
        return reply

    names.reserve(cast(Any, driver), p.ReserveActorName(1, "a1", "counter", None, "job1", False))
    assert answer().error is None
    names.reserve(cast(Any, driver), p.ReserveActorName(2, "a2", "counter", None, "job1", False))
    assert "name_taken" in str(answer().error)
    names.reserve(cast(Any, driver), p.ReserveActorName(3, "a3", "counter", None, "job1", True))
    assert not driver.sent  # get_if_exists: it waits for the holder's creation
    options = p.ActorOptions("Counter", {}, name="counter")
    names.created("a1", options)
    assert answer() == p.Reply(3, ("a1", options))
    names.reserve(cast(Any, driver), p.ReserveActorName(4, "a4", "counter", None, "job1", True))
    assert answer().value == ("a1", options)  # get_if_exists: the live holder
    names.get(cast(Any, driver), p.GetActor(5, "counter", None, "job2"))
    missing = str(answer().error)
    assert "not_found" in missing and "namespace 'ns2'" in missing  # job2's own namespace
    names.get(cast(Any, driver), p.GetActor(6, "counter", "ns1", "job2"))
    assert answer().value == ("a1", options)  # another job, naming the namespace
    names.reserve(cast(Any, driver), p.ReserveActorName(7, "a7", "counter", None, "job2", False))
    assert answer().error is None  # the same name in another namespace
    names.forget("a1")
    names.reserve(cast(Any, driver), p.ReserveActorName(8, "a8", "counter", None, "job1", False))
    assert answer().error is None  # free again once its actor died
    names.reserve(cast(Any, driver), p.ReserveActorName(9, "a9", "counter", None, "job1", True))
    assert not driver.sent  # a8 is not created yet
    names.forget("a8")  # and dies so: the waiting get_if_exists takes the name
    assert answer() == p.Reply(9, None)


class _ActorHost:
    """The node as its actors see it: what they asked of it, in order."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, ...]] = []

    def finish_ok(self, record: TaskRecord, returns: list[p.ObjectLocation]) -> None:
        self.asked.append(("ok", record.spec.task_id))

    def finish_failed(self, record: TaskRecord, error: p.ErrorInfo, *, log_event: bool) -> None:
        self.asked.append(("failed", record.spec.task_id, error.kind))

    def failed_dependency(self, record: TaskRecord) -> p.ErrorInfo | None:
        return None

    def run(self, record: TaskRecord, handle: Any) -> None:
        record.worker = handle
        self.asked.append(("run", record.spec.task_id))

    def infeasible(self, record: TaskRecord, reason: str) -> None:
        self.asked.append(("infeasible", record.spec.task_id))

    def running_event(self, record: TaskRecord, worker_id: str) -> Event:
        return Event(EntityKind.TASK, record.spec.task_id, "running", {"worker_id": worker_id})


async def test_the_actor_director_creates_restarts_and_buries_an_actor(
    gcs_url: str, tmp_path: Path
) -> None:
    """An actor gets a worker of its own; its constructor runs once that worker is
    connected and the node's resources allow; its calls go to that worker; when the
    worker dies mid-call the actor restarts (max_restarts) and the call, which may
    have begun, fails (max_task_retries=0); kill() ends it for good, and the log has
    its whole life."""
    recorder = EventRecorder(gcs_url, writer_node=None)
    await recorder.start()
    objects = ObjectTable(MB, on_free=lambda _location: None)
    tasks = TaskTable("node", objects, recorder)
    resources = ResourcePool({"CPU": 1.0})
    workers = _pool("node", 1, tmp_path)
    groups = _placement_groups(resources, objects, recorder, lambda *_: None, lambda: None)
    spills = SpilledTasks("node", recorder, objects, tasks, resources, {}, link=None)
    envs = _envs(recorder, tmp_path)
    scheduler = LocalScheduler(resources, groups, workers, spills, cast(Any, None), envs)
    host = _ActorHost()
    names = ActorNames()
    elsewhere = ActorsElsewhere("node", recorder, objects, tasks, spills, names, host)
    spawned: set[asyncio.Task[None]] = set()
    director = ActorDirector(
        "node",
        gcs_url,
        tmp_path,
        recorder,
        objects,
        StoreMemory("node", objects),
        tasks,
        scheduler,
        workers,
        groups,
        spills,
        elsewhere,
        names,
        host,
        envs,
        spawn=lambda c: spawned.add(asyncio.get_running_loop().create_task(c)),
    )
    owner = cast(Any, _Submitter())
    options = p.ActorOptions("Counter", {"incr": 1}, max_restarts=1)

    def spec(task_id: str, method: str, resources: dict[str, float]) -> p.TaskSpec:
        return p.TaskSpec(
            task_id, "job", f"Counter.{method}", "f", [], {}, int(method != "__init__"),
            resources, 0, False, actor_id="a1", method=method, actor_options=options,
        )  # fmt: skip

    try:
        director.create(owner, tasks.submit(owner, spec("c1", "__init__", {"CPU": 1.0})))
        first = director.actors["a1"].worker
        assert first is not None and host.asked == []  # its worker is not connected yet
        workers.connected(first.worker_id, cast(Any, _Conn(first.worker_id)))
        director.worker_connected(first)
        assert host.asked == [("run", "c1")] and resources.available["CPU"] == 0
        director.task_done(first, p.TaskDone("c1", 0, []))
        assert host.asked[-1] == ("ok", "c1") and director.alive() == 1
        director.call(tasks.submit(owner, spec("k1", "incr", {})))
        assert host.asked[-1] == ("run", "k1")
        first.process.kill()
        assert await workers.gone(first.worker_id) is not None
        director.worker_lost(first, -9)
        assert host.asked[-1] == ("failed", "k1", "actor_unavailable")  # it may have begun
        second = director.actors["a1"].worker
        assert second is not None and second is not first  # restarted, in a new process
        assert resources.available["CPU"] == 1.0  # until its constructor runs again
        director.kill("a1", no_restart=True)
        assert director.alive() == 0 and director.waiting_for_resources() == 0
        # a caller that had the route sends a call straight to the dead worker after
        # its end was handled: the daemon's copy fails at once (nothing else answers it)
        await workers.gone(second.worker_id)
        director.worker_lost(second, -9)
        late = p.SubmitDirectCall(spec("k2", "incr", {}), second.worker_id)
        director.submit_direct(owner, late)
        assert host.asked[-1] == ("failed", "k2", "actor_died")
    finally:
        await workers.stop()
        await asyncio.gather(*spawned, return_exceptions=True)
        await recorder.close()
    rows = await fetch_rows(
        gcs_url,
        "SELECT event_type FROM events WHERE entity_kind = 'actor' ORDER BY position",
    )
    assert [r["event_type"] for r in rows] == [
        "creation_requested",
        "scheduled",
        "alive",
        "restarting",
        "dead",
    ]


async def test_spilled_tasks_follow_the_spill_policy_and_hand_tasks_to_the_cluster(
    gcs_url: str,
) -> None:
    """Nothing spills from a node alone; with a peer, a task that does not fit may go
    (SPREAD and an affinity to another node must), never an actor call or a placement
    group's task; a spill is a ``spilled`` event with the task's spec, and the task is
    followed until it is forgotten."""
    recorder = EventRecorder(gcs_url, writer_node=None)
    await recorder.start()
    objects = ObjectTable(MB, on_free=lambda _location: None)
    tasks = TaskTable("node", objects, recorder)
    resources = ResourcePool({"CPU": 1.0})
    link = ClusterLink(
        "node", gcs_url, "127.0.0.1", 0, recorder, auth_token=None, tls=None,
        join_offer=None, membership_monitor=False, spawn=lambda *_a, **_k: None,
        on_fenced=lambda: None,
    )  # fmt: skip
    spills = SpilledTasks("node", recorder, objects, tasks, resources, {}, link)

    def task(task_id: str, cpus: float, **more: Any) -> TaskRecord:
        spec = p.TaskSpec(task_id, "job", "f", "fn", [], {}, 1, {"CPU": cpus}, 0, False, **more)
        return tasks.submit(cast(Any, _Submitter()), spec)

    try:
        wide, spread = task("wide", 2.0), task("spread", 1.0, strategy=("SPREAD",))
        affinity = task("aff", 1.0, strategy=("NODE_AFFINITY", "other", False))
        assert not spills.can_spill(wide) and not spills.must_spill(spread)  # alone
        assert "not in the cluster" in str(spills.unschedulable_here(affinity))
        link.node_event(_node_event("peer", "registered", {"address": "192.0.2.1:1"}))
        assert spills.can_spill(wide) and spills.must_spill(spread)
        assert spills.must_spill(affinity) and spills.unschedulable_here(affinity) is None
        call = task("call", 1.0, actor_id="a1", method="m")
        grouped = task("pg", 1.0, strategy=("PLACEMENT_GROUP", "pg1", 0, False))
        assert not spills.can_spill(call) and not spills.can_spill(grouped)
        creation = task("ctor", 4.0, actor_id="a2", method="__init__")
        assert spills.actor_goes_elsewhere(creation)  # this node can never fit it
        spills.spill(wide)
        assert wide.state == "SPILLED" and spills.get("wide") is wide and "wide" in spills
        wide.placed_on = "peer"
        assert spills.placed_on("peer") == [wide] and spills.forget("wide") is wide
        assert "wide" not in spills and spills.placed_on("peer") == []
    finally:
        await recorder.close()
    rows = await fetch_rows(
        gcs_url, "SELECT entity_id, payload FROM events WHERE event_type = 'spilled'"
    )
    assert [r["entity_id"] for r in rows] == ["wide"]
    payload = json.loads(rows[0]["payload"])
    assert payload["from_node"] == "node" and payload["resources"] == {"CPU": 2.0}


async def test_actors_elsewhere_forward_calls_in_order_and_outlive_a_lost_node(
    gcs_url: str,
) -> None:
    """An actor made here that lives on another node: its creation is spilled, its
    calls wait for its placement and are then forwarded in order; when its node dies it
    is made again (max_restarts) and the calls not finished are sent again (each a
    retry); when it cannot restart it dies, its waiting calls fail, its constructor's
    arguments are let go, and its name is free."""
    recorder = EventRecorder(gcs_url, writer_node=None)
    await recorder.start()
    objects = ObjectTable(MB, on_free=lambda _location: None)
    tasks = TaskTable("node", objects, recorder)
    spills = SpilledTasks("node", recorder, objects, tasks, ResourcePool({"CPU": 1.0}), {}, None)
    names, host = ActorNames(), _ActorHost()
    elsewhere = ActorsElsewhere("node", recorder, objects, tasks, spills, names, host)
    owner = cast(Any, _Submitter())
    options = p.ActorOptions("A", {"m": 1}, name="a", max_restarts=1, max_task_retries=1)
    objects.ready(p.ObjectLocation("arg", inline=b"1", size=1))
    objects.hold("arg")

    def spec(task_id: str, method: str, *args: p.Arg) -> p.TaskSpec:
        return p.TaskSpec(
            task_id, "job", f"A.{method}", "fn", list(args), {}, int(method != "__init__"),
            {"CPU": 8.0}, 0, False, actor_id="a1", method=method, actor_options=options,
        )  # fmt: skip

    try:
        creation = tasks.submit(owner, spec("ctor", "__init__", p.Arg(ref="arg")))
        names.created("a1", options)
        objects.pin("arg")  # (pinned by the actor director, which hands the actor over)
        elsewhere.take(creation, owner)
        assert "a1" in elsewhere and spills.get("ctor") is creation  # its creation spilled
        first, second = (tasks.submit(owner, spec(f"c{i}", "m")) for i in (1, 2))
        elsewhere.call(first)
        elsewhere.call(second)
        creation.placed_on = "n1"
        elsewhere.placed(creation, "n1")
        assert spills.calls_of("a1") == [first, second]
        elsewhere.node_lost("n1")  # restarted elsewhere: its calls are sent again
        assert first.attempt == second.attempt == 1 and spills.get("ctor") is creation
        third = tasks.submit(owner, spec("c3", "m"))
        elsewhere.call(third)  # waits for the new placement
        creation.placed_on = "n2"
        elsewhere.placed(creation, "n2")
        assert spills.calls_of("a1") == [first, second, third]
        elsewhere.creation_placed_on_dead_node(creation, "n2")  # no restarts left
        assert elsewhere.alive() == 0 and host.asked == [
            ("failed", "c1", "actor_died"),
            ("failed", "c2", "actor_died"),
            ("failed", "c3", "actor_died"),
        ]
        elsewhere.call(tasks.submit(owner, spec("c4", "m")))  # a call after its death
        assert host.asked[-1] == ("failed", "c4", "actor_died")
        objects.release("arg")
        assert objects.state("arg") == "freed"  # no longer pinned for it
        driver = _Owner()
        names.get(cast(Any, driver), p.GetActor(1, "a", None, "job"))
        assert "not_found" in str(driver.sent[-1].error)
    finally:
        await recorder.close()
    rows = await fetch_rows(
        gcs_url,
        "SELECT entity_id, event_type, payload FROM events"
        " WHERE event_type IN ('spilled', 'forwarded', 'restarting', 'dead') ORDER BY position",
    )
    assert [(r["entity_id"], r["event_type"]) for r in rows] == [
        ("ctor", "spilled"),
        ("c1", "forwarded"),
        ("c2", "forwarded"),
        ("a1", "restarting"),
        ("ctor", "spilled"),
        ("c1", "forwarded"),
        ("c2", "forwarded"),
        ("c3", "forwarded"),
        ("a1", "dead"),
    ]
    assert json.loads(rows[-1]["payload"])["cause"] == "its node n2 died"


class _Client:
    """A driver's or a worker's connection as the node's parts see it."""

    def __init__(self, worker_id: str | None = None) -> None:
        self.worker_id, self.role = worker_id, "worker"
        self.holding: set[str] = set()
        self.sent: list[object] = []

    def send(self, message: object) -> None:
        self.sent.append(message)


class _NoCluster:
    """The remote tasks, the actors and the reconstructor of a node alone that runs
    plain tasks: nothing crosses to another node, no actor, nothing lost."""

    def dispatch_waiting(self) -> None:
        pass

    def done(self, task_id: str) -> None:
        pass


async def test_task_runs_take_tasks_from_submission_to_published_results(
    gcs_url: str, tmp_path: Path
) -> None:
    """A task runs on an idle worker and its result reaches its submitter once its
    events are durable; one whose worker dies is retried (max_retries) and then fails
    with its own error; one cancelled while queued ends cancelled. The log has each
    one's life."""
    recorder = EventRecorder(gcs_url, writer_node=None)
    await recorder.start()
    prefix = f"parts-{uuid.uuid4().hex}"
    spawned: set[asyncio.Task[None]] = set()
    store = ObjectStore(
        prefix,
        8 * MB,
        tmp_path / "spill",
        tmp_path / "durable",
        recorder,
        spawn=lambda c: spawned.add(asyncio.get_running_loop().create_task(c)),
        schedule=lambda: None,
        fetch_remote=lambda *_: None,
        release_remote=lambda *_: None,
        on_lost=lambda *_: None,
    )
    tasks = TaskTable(prefix, store.objects, recorder)
    workers = _pool(prefix, 1, tmp_path)
    resources = ResourcePool({"CPU": 1.0})
    groups = _placement_groups(resources, store.objects, recorder, lambda *_: None, lambda: None)
    spills = SpilledTasks(prefix, recorder, store.objects, tasks, resources, {}, link=None)
    runs = TaskRuns(prefix, recorder, store, tasks, workers, groups, spills)
    nothing = cast(Any, _NoCluster())
    scheduler = LocalScheduler(resources, groups, workers, spills, runs, _envs(recorder, tmp_path))
    runs.wire(scheduler, nothing, nothing, nothing)
    driver = _Client()

    def spec(task_id: str, max_retries: int = 0) -> p.TaskSpec:
        return p.TaskSpec(task_id, "job", "f", "", [], {}, 1, {"CPU": 1.0}, max_retries, False)

    async def published(object_id: str) -> p.ObjectLocation:
        for _ in range(200):
            for message in driver.sent:
                if isinstance(message, p.ObjectsReady):
                    found = [loc for loc in message.locations if loc.object_id == object_id]
                    if found:
                        return found[0]
            await asyncio.sleep(0.025)
        raise AssertionError(f"{object_id} was never published to its submitter")

    try:
        workers.fill()
        (first,) = list(workers)
        worker = _Client(first.worker_id)
        workers.connected(first.worker_id, cast(Any, worker))
        runs.submit(cast(Any, driver), spec("t1"))
        (execute,) = worker.sent
        assert isinstance(execute, p.ExecuteTask) and execute.spec.task_id == "t1"
        result = p.ObjectLocation(spec("t1").return_ids()[0], inline=b"42", size=2)
        runs.task_done(first, p.TaskDone("t1", 0, [result]))
        assert (await published(result.object_id)).inline == b"42"

        runs.submit(cast(Any, driver), spec("t2", max_retries=1))
        runs.submit(cast(Any, driver), spec("t3"))  # queued behind t2: one CPU
        runs.cancel(spec("t3").return_ids()[0], force=False, recursive=False)
        assert (await published(spec("t3").return_ids()[0])).error.kind == "cancelled"
        first.process.kill()  # t2's worker dies: t2 is retried once
        assert await workers.gone(first.worker_id) is not None
        runs.worker_lost(first, -9)  # (the retry finds no idle worker: one is started)
        (second,) = list(workers)
        worker = _Client(second.worker_id)
        workers.connected(second.worker_id, cast(Any, worker))
        runs.scheduler.schedule()
        (execute,) = worker.sent
        assert execute.spec.task_id == "t2" and execute.attempt == 1
        error = p.ErrorInfo("task_error", "ValueError: no", "f")
        runs.task_done(second, p.TaskDone("t2", 1, [], error=error))
        assert (await published(spec("t2").return_ids()[0])).error.message == "ValueError: no"
        assert list(tasks) == [] and resources.available["CPU"] == 1.0
    finally:
        await workers.stop()
        await asyncio.gather(*spawned, return_exceptions=True)
        await recorder.close()
        _forget(prefix)
    rows = await fetch_rows(
        gcs_url,
        "SELECT entity_id, event_type FROM events WHERE entity_kind = 'task' ORDER BY position",
    )
    lives: dict[str, list[str]] = {}
    for row in rows:
        lives.setdefault(row["entity_id"], []).append(row["event_type"])
    assert lives == {
        "t1": ["submitted", "running", "finished"],
        "t2": ["submitted", "running", "retried", "running", "failed"],
        "t3": ["submitted", "cancelled"],
    }
