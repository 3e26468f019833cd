"""The sharded log (migrations/sql/0019_sharded_log.up.sql; controlplane/README.md, "The
sharded log"), against a real PostgreSQL with 4 shards: each job's events in its own
shard, appends to different shards not waiting for one another, positions that put a
cause before its effect across shards, readers that get every event once and each
effect after its cause while shards append concurrently, a projector that applies each
event once, and a single-shard log brought to 4 shards by ``cairn migrate``."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner
from log_rows import fetch_rows, rows, wait_for_rows

from controlplane import schema
from controlplane.cli import main
from controlplane.eventlog import EVERY_NODE, EntityKind, Event, EventAppender, Tailer
from controlplane.eventlog.appender import append_on
from controlplane.eventlog.partitions import PartitionManager, read_parquet_archive
from controlplane.eventlog.tailer import head_positions
from controlplane.projections import Projector, fold

pytestmark = pytest.mark.timeout(120)

SHARDS = 4
HELD_APPEND = (
    "SELECT * FROM cairn_append_v2(ARRAY[$1::uuid], ARRAY[$2::text], "
    "ARRAY['task'::entity_kind], ARRAY[$3::text], ARRAY['submitted'], ARRAY[NULL], "
    'ARRAY[\'{"name": "f", "to_node": "a"}\'::jsonb], ARRAY[NULL::bytea])'
)


@pytest.fixture
def sharded_url(gcs_url: str) -> str:
    """A log of 4 shards, with partitions ahead as a GCS keeps them (an append that
    makes one holds the partitioning row until it commits: every shard waits then)."""
    schema.set_log_shards(gcs_url, SHARDS)
    PartitionManager(gcs_url).ensure_ahead()
    return gcs_url


async def jobs_by_shard(url: str) -> dict[int, str]:
    """A job id for each shard 1 .. SHARDS - 1 (shard 0 also takes the events of no
    job), found by asking the log's own function."""
    found: dict[int, str] = {}
    conn = await asyncpg.connect(url)
    try:
        n = 0
        while len(found) < SHARDS - 1:
            job = f"job-{n}"
            shard = await conn.fetchval("SELECT cairn_shard_of_v1($1, $2)", job, SHARDS)
            if shard != 0:
                found.setdefault(shard, job)
            n += 1
    finally:
        await conn.close()
    return found


def task(job: str, task_id: str, event_type: str = "submitted", **payload: object) -> Event:
    defaults = {"submitted": {"name": "f"}, "running": {"worker_id": "w"}}
    return Event(
        EntityKind.TASK,
        task_id,
        event_type,
        {**defaults.get(event_type, {}), **payload},
        job_id=job,
    )


def node(node_id: str) -> Event:
    return Event(EntityKind.NODE, node_id, "heartbeat", {"available": {}}, node_id=node_id)


async def test_each_jobs_events_go_to_its_shard_with_positions_of_that_shard(
    sharded_url: str,
) -> None:
    jobs = await jobs_by_shard(sharded_url)
    async with EventAppender(sharded_url) as appender:
        for job in jobs.values():
            await appender.append_many([task(job, f"{job}-t{i}") for i in range(3)])
        await appender.append(node("n1"))
    stored = await fetch_rows(
        sharded_url, "SELECT position, shard, job_id, entity_id FROM events ORDER BY position"
    )
    assert len(stored) == 3 * len(jobs) + 1
    shard_of_job = {job: shard for shard, job in jobs.items()}
    for row in stored:
        assert row["shard"] == shard_of_job.get(row["job_id"], 0)  # (no job: shard 0)
        assert row["position"] % SHARDS == row["shard"]
    heads = await fetch_rows(sharded_url, "SELECT shard, last_position FROM event_log_shards")
    assert {r["shard"]: r["last_position"] for r in heads} == {
        shard: max((r["position"] for r in stored if r["shard"] == shard), default=0)
        for shard in range(SHARDS)
    }


async def test_an_event_that_names_no_job_goes_to_its_entitys_job_and_shard(
    sharded_url: str,
) -> None:
    """A node freeing or moving an object may not know its job: the log gives the event
    the job its entity's history names, from the same batch or from what is stored
    (migrations/sql/0020_entity_jobs.up.sql), so the object's history is in one shard."""
    jobs = await jobs_by_shard(sharded_url)
    job = jobs[3]

    def obj(object_id: str, event_type: str, job_id: str | None = None) -> Event:
        payload = {"size_bytes": 1} if event_type in ("created", "transferred") else {}
        return Event(EntityKind.OBJECT, object_id, event_type, payload, job_id=job_id)

    async with EventAppender(sharded_url) as appender:
        await appender.append(obj("stored", "created", job))
        await appender.append_many([obj("stored", "transferred"), obj("stored", "freed")])
        await appender.append_many(
            [obj("batched", "created", job), obj("batched", "freed"), node("n1")]
        )
        await appender.append(obj("unknown", "lost"))  # (no history: no job, shard 0)
    stored = await fetch_rows(
        sharded_url, "SELECT entity_id, job_id, shard FROM events ORDER BY position"
    )
    assert [(r["entity_id"], r["job_id"], r["shard"]) for r in stored] == [
        ("stored", job, 3),
        ("stored", job, 3),
        ("stored", job, 3),
        ("batched", job, 3),
        ("batched", job, 3),
        ("n1", None, 0),
        ("unknown", None, 0),
    ]


async def test_appends_to_different_shards_do_not_wait_for_one_another(sharded_url: str) -> None:
    """An append held open in one shard holds back that shard's next appends and its
    readers there, and nothing else: another job's appends commit and are read."""
    jobs = await jobs_by_shard(sharded_url)
    held_job, free_job = jobs[1], jobs[2]
    slow = await asyncpg.connect(sharded_url)
    try:
        async with EventAppender(sharded_url) as appender, Tailer(sharded_url) as tailer:
            tx = slow.transaction()
            await tx.start()
            held = await slow.fetchrow(HELD_APPEND, uuid.uuid4(), held_job, "held")
            free = await asyncio.wait_for(appender.append(task(free_job, "free")), 5)
            assert [e.entity_id for e in await tailer.read(wait=5)] == ["free"]
            behind = asyncio.ensure_future(appender.append(task(held_job, "behind")))
            await asyncio.sleep(0.5)
            assert not behind.done()  # (its shard's head is locked by the open append)
            assert await tailer.read(wait=0.3) == []  # (nothing past the open append)
            await tx.commit()
            behind_at = await asyncio.wait_for(behind, 5)
            rest = []
            while len(rest) < 2:
                rest += await tailer.read(wait=5)
    finally:
        await slow.close()
    assert [e.entity_id for e in rest] == ["held", "behind"]
    assert held["positions"][0] < behind_at and free % SHARDS == 2


async def test_a_cause_has_a_lower_position_than_its_effect_in_any_shard(
    sharded_url: str,
) -> None:
    """Appends that follow one another (each committed before the next starts) take
    rising positions, whatever their shards, though one shard is far ahead."""
    jobs = await jobs_by_shard(sharded_url)
    busy, quiet = jobs[1], jobs[2]
    async with EventAppender(sharded_url) as appender:
        await appender.append_many([task(busy, f"b{i}") for i in range(200)])
        sequence = []
        for i in range(20):
            job = (busy, quiet, None)[i % 3]
            event = task(job, f"s{i}") if job else node(f"n{i}")
            sequence.append(await appender.append(event))
    assert sequence == sorted(sequence) and len(set(sequence)) == len(sequence)


async def test_an_event_appended_alone_goes_to_its_shard_once_and_wakes_the_readers(
    sharded_url: str,
) -> None:
    """One event appended alone (the append's one-event path, in the call that commits
    and then wakes the readers: migration 0029), and one appended in the caller's own
    transaction: each in its job's shard past every head, stored once when appended
    again, and a waiting reader woken by each (it would poll only after a minute)."""
    jobs = await jobs_by_shard(sharded_url)
    conn = await asyncpg.connect(sharded_url)
    try:
        start = await head_positions(conn)
        async with (
            EventAppender(sharded_url) as appender,
            Tailer(sharded_url, after=start, poll_interval=60) as tailer,
        ):
            ahead = await appender.append_many([task(jobs[3], f"ahead{i}") for i in range(5)])
            assert len(await tailer.read(wait=5)) == 5

            async def woken_by(append: Coroutine[Any, Any, int]) -> tuple[list[int], float]:
                assert await tailer.read(wait=0) == []  # (read up to now; not woken since)
                began = time.monotonic()
                at = await append
                await tailer.woken(20)  # (only a notification wakes it before then)
                took = time.monotonic() - began
                return [at, *(e.position for e in await tailer.read(wait=5))], took

            alone = task(jobs[1], "alone")
            (at, *read), took = await woken_by(appender.append(alone))
            assert read == [at] and took < 10
            assert at % SHARDS == 1 and at > max(ahead)  # (past shard 3's head)
            assert await appender.append(alone) == at  # (stored once)

            async def in_transaction() -> int:
                async with conn.transaction():
                    [position] = await append_on(conn, [task(jobs[2], "in-tx")])
                return position

            (in_tx, *read), took = await woken_by(in_transaction())
            assert read == [in_tx] and took < 10
            assert in_tx % SHARDS == 2 and in_tx > at
    finally:
        await conn.close()
    stored = await fetch_rows(
        sharded_url, "SELECT count(*) AS n FROM events WHERE entity_id IN ('alone', 'in-tx')"
    )
    assert stored[0]["n"] == 2


async def test_a_batch_across_shards_commits_together_its_positions_rising_in_its_order(
    sharded_url: str,
) -> None:
    jobs = await jobs_by_shard(sharded_url)
    a, b = jobs[1], jobs[3]
    async with EventAppender(sharded_url) as appender:
        first = [task(a, "a1"), task(b, "b1"), node("n1"), task(a, "a2"), task(b, "b2")]
        positions = await appender.append_many(first)
        assert positions == sorted(positions) and len(set(positions)) == 5
        assert [p % SHARDS for p in positions] == [1, 3, 0, 1, 3]
        # stored once: a batch repeating some of them gives those their old positions
        again = await appender.append_many([first[1], task(a, "a3"), first[3]])
    assert again[0] == positions[1] and again[2] == positions[3]
    assert again[1] > positions[-1]
    stored = await fetch_rows(sharded_url, "SELECT count(*) AS n FROM events")
    assert stored[0]["n"] == 6


async def test_readers_get_every_event_once_and_each_effect_after_its_cause(
    sharded_url: str,
) -> None:
    """Writers append to every shard at once, each event of a chain appended once the one
    before it (in another shard) committed, with an append held open in one shard across
    the reads. An unfiltered reader and a node's reader, in small batches, get each of
    their events once, every shard's in position order, and each event after its cause;
    the node's reader none that is not its own."""
    jobs = await jobs_by_shard(sharded_url)
    job_list = [None, *jobs.values()]  # (None: shard 0's events of no job)

    async def chain(appender: EventAppender, c: int) -> None:
        cause: str | None = None
        for link in range(12):
            job = job_list[(c + link) % len(job_list)]
            entity = f"c{c}-{link}"
            payload: dict[str, object] = {"to_node": "a" if link % 2 else "b"}
            if cause is not None:
                payload["cause"] = cause
            if job is None:
                event = Event(EntityKind.NODE, entity, "heartbeat", {"available": {}, **payload})
            else:
                event = task(job, entity, **payload)
            await appender.append(event)
            cause = entity

    slow = await asyncpg.connect(sharded_url)
    try:
        async with (
            EventAppender(sharded_url) as appender,
            Tailer(sharded_url, batch_size=5) as everything,
            Tailer(sharded_url, reader="a", batch_size=3) as node_a,
        ):
            tx = slow.transaction()
            await tx.start()
            await slow.fetchrow(HELD_APPEND, uuid.uuid4(), jobs[2], "held")
            writers = asyncio.gather(*(chain(appender, c) for c in range(8)))
            got: list = []
            got_a: list = []
            for _ in range(10):  # (the chains that reach the held shard wait for it)
                got += await everything.read(wait=0.1)
                got_a += await node_a.read(wait=0.05)
            assert "held" not in {e.entity_id for e in got + got_a}
            await tx.commit()
            while not writers.done():
                got += await everything.read(wait=0.1)
                got_a += await node_a.read(wait=0.05)
            await writers
            conn = await asyncpg.connect(sharded_url)
            heads = await head_positions(conn)
            await conn.close()
            while not everything.reached(heads):
                got += await everything.read(wait=5)
            while not node_a.reached(heads):
                got_a += await node_a.read(wait=5)
    finally:
        await slow.close()
    stored = await fetch_rows(sharded_url, "SELECT event_id, payload FROM events")
    assert len(stored) == 8 * 12 + 1
    import json

    mine = {r["event_id"] for r in stored if json.loads(r["payload"]).get("to_node") == "a"}
    for reader, expected in ((got, {r["event_id"] for r in stored}), (got_a, mine)):
        ids = [e.event_id for e in reader]
        assert len(ids) == len(set(ids)) and set(ids) == expected  # each once, all of them
        per_shard = defaultdict(list)
        for e in reader:
            per_shard[e.position % SHARDS].append(e.position)
        assert all(found == sorted(found) for found in per_shard.values())
    order = {e.entity_id: n for n, e in enumerate(got)}
    for e in got:
        if "cause" in e.payload:
            assert order[e.payload["cause"]] < order[e.entity_id], e.entity_id


async def test_a_projector_applies_each_event_once_across_shards(sharded_url: str) -> None:
    """Two projectors of one name, stopped and started while four shards are written:
    the projection is the fold of the whole log in position order."""
    jobs = list((await jobs_by_shard(sharded_url)).values())

    async def write(appender: EventAppender, start: int) -> None:
        for i in range(start, start + 30):
            job = jobs[i % len(jobs)]
            await appender.append_many(
                [task(job, f"t{i}"), task(job, f"t{i}", "running"), task(job, f"t{i}", "finished")]
            )

    async with EventAppender(sharded_url) as appender:
        await write(appender, 0)
        async with Projector(sharded_url, batch_size=7) as first:
            await first.step(wait=1)
        writing = asyncio.ensure_future(write(appender, 30))
        async with (
            Projector(sharded_url, batch_size=7) as second,
            Projector(sharded_url, batch_size=5) as third,
        ):
            while not writing.done():
                await asyncio.gather(second.step(wait=0.1), third.step(wait=0.1))
            await writing
            await second.catch_up()
            await third.catch_up()
    events = await fetch_rows(
        sharded_url,
        "SELECT position, event_id, recorded_at, job_id, entity_kind::text, entity_id, "
        "event_type, node_id, payload::text, data FROM events ORDER BY position",
    )
    from controlplane.eventlog import RecordedEvent

    expected = fold([RecordedEvent.from_row(r) for r in events], {})
    tasks = await fetch_rows(sharded_url, "SELECT task_id, state FROM projection.tasks")
    assert {r["task_id"]: r["state"] for r in tasks} == {
        key: row["state"] for (table, key), row in expected.items() if table == "tasks"
    }
    assert len(tasks) == 60 and {r["state"] for r in tasks} == {"FINISHED"}


async def test_cairn_migrate_brings_a_single_shard_log_to_four(gcs_url: str) -> None:
    """Its events stay where they are (shard 0, positions 1..n); what comes next goes to
    the jobs' shards, past them; a reader from the start reads both, in order."""
    async with EventAppender(gcs_url) as appender:
        before = await appender.append_many([task("job-old", f"t{i}") for i in range(5)])
    assert before == [1, 2, 3, 4, 5]
    result = CliRunner().invoke(main, ["migrate", "--gcs-url", gcs_url, "--log-shards", "4"])
    assert result.exit_code == 0, result.output
    assert "log shards: 1 -> 4" in result.output
    assert schema.log_shards(gcs_url) == 4
    jobs = await jobs_by_shard(gcs_url)
    async with EventAppender(gcs_url) as appender:
        after = [await appender.append(task(job, f"{job}-t")) for job in jobs.values()]
        # a job of the old log goes on in its shard now, past the old events
        old_job = await appender.append(task("job-old", "t-new"))
    assert min(after) > 5 and old_job > max(after)
    async with Tailer(gcs_url, batch_size=2) as tailer:
        got = []
        while len(got) < 5 + len(after) + 1:
            got += await tailer.read(wait=5)
    assert [e.position for e in got] == [*before, *after, old_job]
    stored = await fetch_rows(gcs_url, "SELECT position, shard FROM events WHERE position <= 5")
    assert {r["shard"] for r in stored} == {0}


async def test_an_event_of_every_node_reaches_each_nodes_reader_from_shard_zero(
    sharded_url: str,
) -> None:
    async with (
        EventAppender(sharded_url) as appender,
        Tailer(sharded_url, reader="x") as reader,
    ):
        await appender.append(
            Event(
                EntityKind.NODE,
                "n1",
                "registered",
                {"address": "h:1", "resources": {}, "to_node": EVERY_NODE},
            )
        )
        got = await reader.read(wait=5)
    assert [e.entity_id for e in got] == ["n1"] and got[0].position % SHARDS == 0


def test_gc_retires_the_full_partitions_of_a_sharded_log(gcs_url: str, tmp_path: Path) -> None:
    """Partitions hold every shard's events; gc retires those whose positions are all
    handed out and settled (no append in flight can still take one), keeps the hot one,
    and appends go on in every shard."""
    schema.set_log_shards(gcs_url, SHARDS)
    PartitionManager(gcs_url).configure(partition_size=40, partitions_ahead=1)
    jobs = list(asyncio.run(jobs_by_shard(gcs_url)).values())

    async def append_rounds(rounds: int) -> list[int]:
        async with EventAppender(gcs_url) as appender:
            positions = []
            for r in range(rounds):
                job = jobs[r % len(jobs)]
                positions += await appender.append_many(
                    [task(job, f"{job}-r{r}-t{i}") for i in range(5)]
                )
            return positions

    old = asyncio.run(append_rounds(2))
    young = asyncio.run(append_rounds(6))
    assert min(young) > max(old)  # (each round past every head)
    head = max(young)
    wait_for_rows(
        gcs_url,
        "SELECT 1 FROM events HAVING clock_timestamp() - max(recorded_at) > interval '1 s'",
        timeout=30,
    )
    before = rows(gcs_url, "SELECT position FROM events ORDER BY position")
    result = CliRunner().invoke(
        main, ["gc", "--older-than", "1s", "--gcs-url", gcs_url, "--archive", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    states = {
        (p.lower_bound, p.upper_bound): p.state for p in PartitionManager(gcs_url).partitions()
    }
    assert len(states) >= 4  # (of 40 positions each: at least 2 full, the head's, one ahead)
    for (lower, upper), state in states.items():
        assert state == ("dropped" if upper <= head + 1 else "attached"), (lower, upper)
    hot = next(lower for lower, upper in states if lower <= head < upper)
    kept = rows(gcs_url, "SELECT position FROM events ORDER BY position")
    assert [r["position"] for r in kept] == [r["position"] for r in before if r["position"] >= hot]
    archived = sum(read_parquet_archive(f).num_rows for f in tmp_path.glob("*.parquet"))
    assert archived == len(before) - len(kept) > 0
    after = asyncio.run(append_rounds(3))
    assert min(after) > max(young) and {p % SHARDS for p in after} == set(range(1, SHARDS))


async def test_readers_of_a_sharded_log_are_woken_after_each_append_commits(
    sharded_url: str,
) -> None:
    """The wake-ups of a sharded log's appends are sent after their commit (not in it):
    with a 30 s poll, only they can wake the readers, the filtered one only for its own."""
    jobs = await jobs_by_shard(sharded_url)
    async with (
        EventAppender(sharded_url) as appender,
        Tailer(sharded_url, poll_interval=30) as everything,
        Tailer(sharded_url, reader="a", poll_interval=30) as node_a,
    ):
        await everything.read(wait=0.2)  # (both connected and listening)
        await node_a.read(wait=0.2)
        for_everything = asyncio.ensure_future(everything.read())
        for_a = asyncio.ensure_future(node_a.read())
        sent = time.monotonic()
        await appender.append(task(jobs[1], "t-b", to_node="b"))
        assert [e.entity_id for e in await for_everything] == ["t-b"]
        await asyncio.sleep(0.3)
        assert not for_a.done()  # (not woken for another node's event)
        await appender.append(task(jobs[2], "t-a", to_node="a"))
        assert [e.entity_id for e in await for_a] == ["t-a"]
        assert time.monotonic() - sent < 5
