"""Membership on a real PostgreSQL: a silent node is declared dead once, however many
monitors run; a node declared dead is fenced (its next ping tells it to stop)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from urllib.parse import urlsplit

import asyncpg
import pytest

from controlplane.errors import NodeFencedError
from controlplane.eventlog import EntityKind, Event, EventAppender, Tailer
from controlplane.eventlog.clock import AppendBound, LogClock
from controlplane.eventlog.connection import DEFAULT_CONNECT_TIMEOUT_S
from controlplane.membership import BOUND_AHEAD, LivenessPinger, MembershipMonitor, cluster_nodes
from controlplane.sql import queries

pytestmark = pytest.mark.timeout(60)


async def _register(url: str, node_id: str) -> None:
    async with EventAppender(url) as appender:
        await appender.append(
            Event(
                EntityKind.NODE,
                node_id,
                "registered",
                {"address": "127.0.0.1:1", "resources": {"CPU": 1.0}},
                node_id=node_id,
            )
        )
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(queries["register_liveness"], node_id, "127.0.0.1:1", 0, BOUND_AHEAD)
    finally:
        await conn.close()


async def _silence(url: str, node_id: str, seconds: float) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE node_liveness SET last_ping = clock_timestamp() - make_interval(secs => $2)"
            " WHERE node_id = $1",
            node_id,
            seconds,
        )
    finally:
        await conn.close()


async def _pings(url: str, node_id: str, count: int) -> None:
    """Until the node's row shows ``count`` pings after the one read first."""
    conn = await asyncpg.connect(url)
    try:
        query = "SELECT last_ping FROM node_liveness WHERE node_id = $1"
        seen = [await conn.fetchval(query, node_id)]
        deadline = asyncio.get_running_loop().time() + 10
        while len(seen) <= count:
            assert asyncio.get_running_loop().time() < deadline, f"pings: {seen}"
            if (last := await conn.fetchval(query, node_id)) != seen[-1]:
                seen.append(last)
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def test_many_monitors_log_one_death(gcs_url: str) -> None:
    await _register(gcs_url, "n-silent")
    await _register(gcs_url, "n-alive")
    await _silence(gcs_url, "n-silent", 10)
    monitors = [MembershipMonitor(gcs_url, dead_after=1.5) for _ in range(4)]
    try:
        declared = await asyncio.gather(*(m.check_once() for m in monitors))
        again = await asyncio.gather(*(m.check_once() for m in monitors))
    finally:
        for monitor in monitors:
            await monitor.close()
    assert sorted(n for found in declared for n in found) == ["n-silent"]
    assert all(found == [] for found in again)
    conn = await asyncpg.connect(gcs_url)
    try:
        deaths = await conn.fetch(
            "SELECT entity_id, payload->>'cause' AS cause FROM events "
            "WHERE entity_kind = 'node' AND event_type = 'dead'"
        )
    finally:
        await conn.close()
    assert [r["entity_id"] for r in deaths] == ["n-silent"]
    assert "missed heartbeats" in deaths[0]["cause"]
    nodes = {n["node_id"]: n for n in await cluster_nodes(gcs_url)}
    assert nodes["n-silent"]["state"] == "DEAD" and nodes["n-alive"]["state"] == "ALIVE"


async def test_a_node_declared_dead_is_fenced(gcs_url: str) -> None:
    """...and its bound (migration 0032), renewed by each ping past the node's clock,
    is renewed no more."""
    fenced = asyncio.Event()
    clock, bound = LogClock(), AppendBound()
    pinger = LivenessPinger(
        gcs_url, "n-paused", "127.0.0.1:1", fenced.set, clock=clock, bound=bound
    )
    await pinger.register()
    assert bound.position is not None and bound.position >= BOUND_AHEAD
    clock.saw(10**12)
    run = asyncio.create_task(pinger.run())
    try:
        await _pings(gcs_url, "n-paused", 2)  # the first one answered: it goes on
        assert not fenced.is_set() and not run.done()  # pinging: alive
        assert bound.position == 10**12 + BOUND_AHEAD
        await _silence(gcs_url, "n-paused", 10)  # as if it had been paused
        assert await MembershipMonitor(gcs_url, dead_after=5).check_once() == ["n-paused"]
        clock.saw(2 * 10**12)
        await asyncio.wait_for(fenced.wait(), 5)
        await asyncio.wait_for(run, 5)  # and it stops pinging
        assert bound.position == 10**12 + BOUND_AHEAD
        # declared dead already: leaving logs no second death
        assert not await pinger.leave(_dead("n-paused"))
    finally:
        run.cancel()
    assert await _deaths(gcs_url, "n-paused") == ["missed heartbeats"]


def _dead(node_id: str) -> Event:
    return Event(EntityKind.NODE, node_id, "dead", {"cause": "shutdown"}, node_id=node_id)


async def _deaths(url: str, node_id: str) -> list[str]:
    """The causes of the node's ``dead`` events (first words), in log order."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT payload->>'cause' AS cause FROM events WHERE entity_id = $1"
            " AND event_type = 'dead' ORDER BY position",
            node_id,
        )
    finally:
        await conn.close()
    return [row["cause"].split(":")[0] for row in rows]


async def test_a_clean_leave_logs_its_death_with_the_end_of_its_liveness(gcs_url: str) -> None:
    """The ``dead`` event commits with the liveness row's end: a daemon killed before
    it leaves is still declared dead by the monitor, and one that left is not again."""
    pinger = LivenessPinger(gcs_url, "n-leaving", "127.0.0.1:1", lambda: None)
    await pinger.register()
    assert await pinger.leave(_dead("n-leaving"))
    await _silence(gcs_url, "n-leaving", 10)
    monitor = MembershipMonitor(gcs_url, dead_after=1.5)
    try:
        assert await monitor.check_once() == []
    finally:
        await monitor.close()
    assert await _deaths(gcs_url, "n-leaving") == ["shutdown"]


async def test_a_zombie_schedulers_placements_are_refused(gcs_url: str) -> None:
    """A scheduler paused (SIGSTOP) with a stale view, resumed after its replacement
    placed the same spills, appends placements whose ids the log already holds: none is
    stored, so each task keeps the replacement's node."""
    from controlplane.eventlog import Tailer
    from controlplane.scheduler import GlobalScheduler

    for node in ("a", "b"):
        await _register(gcs_url, node)
    spills = [
        Event(
            EntityKind.TASK,
            f"task-{n}",
            "spilled",
            {"attempt": 0, "resources": {"CPU": 1}, "args": {}, "from_node": "a"},
            job_id="job",
        )
        for n in range(20)
    ]
    async with EventAppender(gcs_url) as appender:
        await appender.append_many(spills)

    async def folded() -> GlobalScheduler:
        scheduler = GlobalScheduler(gcs_url)
        async with Tailer(gcs_url) as tailer:
            while events := await tailer.read(wait=0.1):
                for event in events:
                    scheduler.apply(event)
        return scheduler

    zombie, replacement = await folded(), await folded()  # the same view of the spills
    replacement.nodes["b"].available = {"CPU": -100.0}  # it saw b swamped: all to a
    zombie.nodes["a"].available = {"CPU": -100.0}  # the zombie's stale view: all to b
    for scheduler in (replacement, zombie):  # the zombie resumes after the replacement
        await scheduler.appender.start()
        try:
            await scheduler.place_pending()
        finally:
            await scheduler.appender.close()
    conn = await asyncpg.connect(gcs_url)
    try:
        rows = await conn.fetch(
            "SELECT entity_id, payload->>'node_id' AS node FROM events "
            "WHERE event_type = 'placed' AND entity_kind = 'task'"
        )
    finally:
        await conn.close()
    assert sorted(row["entity_id"] for row in rows) == sorted(e.entity_id for e in spills)
    assert {row["node"] for row in rows} == {"a"}  # the replacement's, every one


async def test_a_restarted_scheduler_reads_on_from_its_checkpoint(gcs_url: str) -> None:
    """A scheduler saves its folded state every few events; a new one loads it and reads
    only what came after, and ends with the same view as one folding the whole log."""
    from controlplane.scheduler import GlobalScheduler

    for node in ("a", "b"):
        await _register(gcs_url, node)

    def spill(n: int) -> Event:
        return Event(
            EntityKind.TASK,
            f"task-{n}",
            "spilled",
            {"attempt": 0, "resources": {"CPU": 1}, "args": {}, "from_node": "a"},
            job_id="job",
        )

    async with EventAppender(gcs_url) as appender:
        await appender.append_many([spill(n) for n in range(30)])
    first = GlobalScheduler(gcs_url, checkpoint_every=10)
    running = asyncio.create_task(first.run())
    await asyncio.wait_for(first.following.wait(), 30)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)

    async with EventAppender(gcs_url) as appender:
        await appender.append_many([spill(n) for n in range(30, 35)])
    restarted = GlobalScheduler(gcs_url, checkpoint_every=10)
    start, heads = await restarted.load_checkpoint()
    assert 30 <= max(start) < max(heads)  # past the first spills and their placements, not the new
    conn = await asyncpg.connect(gcs_url)
    try:
        await conn.execute("DELETE FROM checkpoints")
        placed = await conn.fetch("SELECT entity_id FROM events WHERE event_type = 'placed'")
    finally:
        await conn.close()
    assert len(placed) == 30
    whole = GlobalScheduler(gcs_url)
    assert await whole.load_checkpoint() == ([0], heads)
    for scheduler, after in ((restarted, start), (whole, [0])):
        async with Tailer(gcs_url, after=after) as tailer:
            while not tailer.reached(heads):
                for event in await tailer.read(wait=1):
                    scheduler.apply(event)
    assert (
        sorted(restarted.pending) == sorted(whole.pending) == [f"task-{n}" for n in range(30, 35)]
    )
    assert restarted.placed == whole.placed and set(restarted.nodes) == set(whole.nodes)


async def test_the_log_refuses_the_appends_of_a_node_declared_dead(gcs_url: str) -> None:
    """A node cut off for longer than the death timeout is declared dead; what its old
    incarnation appends afterwards (a late result) is not stored, a stale_refused event
    records it, and no event of the node follows its dead event in the log."""
    await _register(gcs_url, "n-cut")
    await _register(gcs_url, "n-left")
    fenced_errors: list[NodeFencedError] = []
    async with (
        EventAppender(gcs_url, writer_node="n-cut") as cut,
        EventAppender(gcs_url, writer_node="n-left") as left,
    ):
        cut.on_fenced = fenced_errors.append
        before = await cut.append(_task_event("t-before", "n-cut"))
        await _silence(gcs_url, "n-cut", 60)
        assert await MembershipMonitor(gcs_url, dead_after=1.0).check_once() == ["n-cut"]
        with pytest.raises(NodeFencedError, match="declared dead"):
            await cut.append(_task_event("t-late", "n-cut"))
        assert len(fenced_errors) == 1
        with pytest.raises(NodeFencedError):  # and from now on at once
            await cut.append(_task_event("t-later", "n-cut"))
        # a node that left cleanly is not fenced: its last events land
        conn = await asyncpg.connect(gcs_url)
        try:
            await conn.execute(queries["declare_node_gone"], "n-left")
        finally:
            await conn.close()
        assert await left.append(_task_event("t-last", "n-left")) > before
    conn = await asyncpg.connect(gcs_url)
    try:
        rows = await conn.fetch(
            "SELECT position, entity_id, event_type, node_id, payload::text AS payload "
            "FROM events ORDER BY position"
        )
    finally:
        await conn.close()
    tasks = {r["entity_id"] for r in rows if r["event_type"] == "submitted"}
    assert tasks == {"t-before", "t-last"}  # t-late was never stored
    (refusal,) = [r for r in rows if r["event_type"] == "stale_refused"]
    assert refusal["entity_id"] == "n-cut" and refusal["node_id"] is None
    payload = json.loads(refusal["payload"])
    assert payload["events"] == 1 and payload["event_types"] == ["submitted"]
    assert payload["entity_ids"] == ["t-late"] and "declared dead" in payload["reason"]
    dead_at = next(r["position"] for r in rows if r["event_type"] == "dead")
    assert all(r["position"] <= dead_at for r in rows if r["node_id"] == "n-cut")


def _task_event(task_id: str, node_id: str) -> Event:
    return Event(
        EntityKind.TASK,
        task_id,
        "submitted",
        {"name": "f", "function_id": "f", "num_returns": 1},
        job_id="j",
        node_id=node_id,
    )


class _Gate:
    """A TCP relay to the GCS that a test can shut -- every connection through it cut,
    new ones refused, as in an outage -- and open again on the same port."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._url = parts
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.accepted = 0

    @property
    def url(self) -> str:
        netloc = self._url.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        return self._url._replace(
            netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host
        ).geturl()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def shut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= {writer, up_writer}


async def test_after_an_outage_the_monitor_gives_pingers_a_connect_timeout_more(
    gcs_url: str,
) -> None:
    """While the GCS was away, no node could ping: once it answers again the monitor
    declares nobody dead before ``dead_after`` has passed, plus the time a node's pinger
    may spend in one attempt to reconnect (DEFAULT_CONNECT_TIMEOUT_S); a node still
    silent after that is declared dead."""
    await _register(gcs_url, "n-slow")
    pinger = LivenessPinger(gcs_url, "n-slow", "127.0.0.1:1", lambda: None)
    pinging = asyncio.create_task(pinger.run())
    gate = _Gate(gcs_url)
    await gate.open()
    monitor = MembershipMonitor(gate.url, dead_after=1.0)
    watching = asyncio.create_task(monitor.run())
    try:
        await asyncio.sleep(0.75)  # checks: the node pings, it is alive
        assert gate.accepted == 1 and await _deaths(gcs_url, "n-slow") == []
        await gate.shut()  # the outage: the monitor cannot reach the GCS...
        pinging.cancel()  # ... nor the node, whose pings stop
        await asyncio.sleep(1.5)
        await gate.open()
        back = time.monotonic()
        await asyncio.sleep(2.5)  # past dead_after since it is back: not yet
        assert gate.accepted == 2 and await _deaths(gcs_url, "n-slow") == []
        while not await _deaths(gcs_url, "n-slow"):
            assert time.monotonic() < back + 20, "the silent node was never declared dead"
            await asyncio.sleep(0.1)
        assert time.monotonic() - back >= 1.0 + DEFAULT_CONNECT_TIMEOUT_S - 0.25
    finally:
        for task in (pinging, watching):
            task.cancel()
        await asyncio.gather(pinging, watching, return_exceptions=True)
        await monitor.close()
        await gate.shut()
    assert await _deaths(gcs_url, "n-slow") == ["missed heartbeats"]


async def test_a_job_whose_drivers_node_is_declared_dead_fails_with_it(gcs_url: str) -> None:
    """A job submission whose driver ran on a node the monitor declares dead is marked
    FAILED in the same transaction (controlplane/jobs.py); one that ended is left be."""
    await _register(gcs_url, "n-head-gone")
    await _register(gcs_url, "n-head-alive")
    sub = EntityKind.SUBMISSION
    async with EventAppender(gcs_url) as appender:
        for sub_id, node_id in (("job-on-gone", "n-head-gone"), ("job-on-alive", "n-head-alive")):
            await appender.append_many(
                [
                    Event(sub, sub_id, "submitted", {"entrypoint": "python driver.py"}),
                    Event(sub, sub_id, "running", {"pid": 1, "driver_node_id": node_id}),
                ]
            )
        await appender.append_many(
            [
                Event(sub, "job-ended", "submitted", {"entrypoint": "true"}),
                Event(sub, "job-ended", "running", {"pid": 2, "driver_node_id": "n-head-gone"}),
                Event(sub, "job-ended", "succeeded", {"driver_exit_code": 0}),
            ]
        )
    await _silence(gcs_url, "n-head-gone", 10)
    monitor = MembershipMonitor(gcs_url, dead_after=5)
    try:
        assert await monitor.check_once() == ["n-head-gone"]
    finally:
        await monitor.close()
    conn = await asyncpg.connect(gcs_url)
    try:
        failed = await conn.fetch(
            "SELECT entity_id, payload FROM events WHERE entity_kind = 'submission'"
            " AND event_type = 'failed'"
        )
    finally:
        await conn.close()
    assert [row["entity_id"] for row in failed] == ["job-on-gone"]
    assert "n-head-gone" in json.loads(failed[0]["payload"])["error"]
