"""Migrations up and down on a real database, and the partition lifecycle: roll over,
detach concurrently while appends run, export to Parquet, drop."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from log_rows import rows

from controlplane import schema
from controlplane.errors import GcsError
from controlplane.eventlog import EntityKind, Event, EventAppender, partitions
from controlplane.eventlog.partitions import PartitionManager, read_parquet_archive
from controlplane.sql import queries

pytestmark = pytest.mark.timeout(120)


def public_tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r[0] for r in rows}


def test_migrations_run_up_from_empty_and_down_again(empty_db_url: str) -> None:
    assert public_tables(empty_db_url) == set()
    schema.upgrade(empty_db_url)
    assert {
        "events",
        "event_log_head",
        "event_partitions",
        "subscriptions",
    } <= public_tables(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        views = {
            r[0] for r in conn.execute("SELECT viewname FROM pg_views WHERE schemaname = 'public'")
        }
        projections = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'projection'")
        }
    assert {"jobs", "tasks", "task_attempts", "objects", "actors", "actor_calls", "nodes"} <= views
    assert projections == {"jobs", "tasks", "objects", "actors", "nodes"}
    PartitionManager(empty_db_url).ensure_ahead()
    schema.downgrade(empty_db_url)
    assert public_tables(empty_db_url) == {"alembic_version"}
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_type WHERE typname = 'entity_kind'"
        ).fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'cairn_%'"
        ).fetchone() == (0,)
    schema.upgrade(empty_db_url)  # and up again
    assert "events" in public_tables(empty_db_url)


def test_the_logs_appends_run_on_generic_plans_and_reads_are_planned_per_call(
    empty_db_url: str,
) -> None:
    """Migration 0025: without it, each append planned its statements over every
    partition again (see its header); 0027 takes the reader back off it (a generic plan
    made while the hot partition was new scanned its primary key); down to 0024, none.
    (0032 replaces the fenced append of a log on several servers by one with a bound.)"""
    appends = {"cairn_append_v2", "cairn_append_fenced_v2", "cairn_append_after_v1"}
    at_head = appends | {"cairn_append_fenced_after_v2"}
    before_bounds = appends | {"cairn_append_fenced_after_v1"}
    everything = at_head | before_bounds | {"cairn_read_events_v1"}
    query = (
        "SELECT proname FROM pg_proc WHERE proname = ANY (%s) "
        "AND 'plan_cache_mode=force_generic_plan' = ANY (proconfig)"
    )
    schema.upgrade(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        assert {r[0] for r in conn.execute(query, (list(everything),))} == at_head
    schema.downgrade(empty_db_url, "0031_union_without_servers")
    with psycopg.connect(empty_db_url) as conn:
        assert {r[0] for r in conn.execute(query, (list(everything),))} == before_bounds
    schema.downgrade(empty_db_url, "0026_submission_index_predicate")
    with psycopg.connect(empty_db_url) as conn:
        assert {r[0] for r in conn.execute(query, (list(everything),))} == (
            before_bounds | {"cairn_read_events_v1"}
        )
    schema.downgrade(empty_db_url, "0024_reads_after_heads")
    with psycopg.connect(empty_db_url) as conn:
        assert {r[0] for r in conn.execute(query, (list(everything),))} == set()


@pytest.mark.parametrize("made_before_submissions", [False, True])
def test_the_submissions_index_serves_their_queries_however_the_log_was_migrated(
    empty_db_url: str, made_before_submissions: bool
) -> None:
    """Migration 0026 names the enum label in the index's predicate, except where it runs
    in the transaction that added the label to a type committed before (a log made before
    0016 brought to head in one step), where the function's predicate stays: the queries
    find their rows through the index either way."""
    if made_before_submissions:
        schema.upgrade(empty_db_url, "0015_runtime_env_packages")
    schema.upgrade(empty_db_url)
    asyncio.run(_append_submissions(empty_db_url))
    with psycopg.connect(empty_db_url) as conn:
        predicate = conn.execute(
            "SELECT pg_get_expr(indpred, indrelid) FROM pg_index "
            "WHERE indexrelid = 'events_submission_idx'::regclass"
        ).fetchone()
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_bitmapscan = off")
        sql = (
            queries["job_submission_events"].replace("$1::text", "%s::text").replace("= $1", "= %s")
        )
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {sql}", ("sub-1", "sub-1")))
        rows = conn.execute(sql, ("sub-1", "sub-1")).fetchall()
    assert predicate is not None
    if made_before_submissions:
        assert "cairn_is_submission" in predicate[0]
    else:
        assert predicate[0] == "(entity_kind = 'submission'::entity_kind)"
    assert "events_submission_idx" in plan or "_entity_id_position_idx" in plan
    assert "Seq Scan" not in plan
    assert [(r[0], r[1]) for r in rows] == [("sub-1", "submitted"), ("sub-1", "running")]


async def _append_submissions(url: str) -> None:
    async with EventAppender(url) as appender:
        for sub, state in (("sub-1", "submitted"), ("sub-2", "submitted"), ("sub-1", "running")):
            payload: dict[str, object] = {"entrypoint": "python x.py"}
            if state == "running":
                payload = {"pid": 7, "driver_node_id": "n1"}
            await appender.append(Event(EntityKind.SUBMISSION, sub, state, payload))


def test_concurrent_migrators_do_not_collide(empty_db_url: str) -> None:
    """Several processes (nodes starting at once) migrating one database."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=schema.upgrade, args=(empty_db_url,)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    assert "events" in public_tables(empty_db_url)


async def _append(url: str, count: int, prefix: str) -> list[int]:
    async with EventAppender(url, max_batch=50) as appender:
        return await asyncio.gather(
            *(
                appender.append(
                    Event(
                        EntityKind.OBJECT,
                        f"{prefix}-{n}",
                        "created",
                        {"size_bytes": n, "note": "quote ' and ; ok"},
                        job_id="job-1",
                        data=bytes([n % 256]) * 3,
                    )
                )
                for n in range(count)
            )
        )


def test_partitions_are_created_ahead_and_on_demand(gcs_url: str) -> None:
    manager = PartitionManager(gcs_url)
    manager.configure(partition_size=100, partitions_ahead=2)
    assert manager.ensure_ahead() == 2
    assert manager.ensure_ahead() == 0
    # appends run past the prepared partitions: the append makes what it needs
    positions = asyncio.run(_append(gcs_url, 450, "o"))
    assert sorted(positions) == list(range(1, 451))
    bounds = [(p.lower_bound, p.upper_bound) for p in manager.partitions()]
    assert bounds[:5] == [(1, 101), (101, 201), (201, 301), (301, 401), (401, 501)]
    manager.ensure_ahead()
    assert manager.partitions()[-1].upper_bound >= 450 + 200


def test_detach_export_and_drop_while_appends_run(gcs_url: str, tmp_path: Path) -> None:
    manager = PartitionManager(gcs_url)
    manager.configure(partition_size=200, partitions_ahead=1)
    asyncio.run(_append(gcs_url, 500, "first"))
    oldest = manager.partitions()[0]
    with psycopg.connect(gcs_url) as conn:
        expected = conn.execute(
            "SELECT position, event_id::text, recorded_at, job_id, entity_kind::text, entity_id,"
            " event_type, node_id, payload::text, data FROM events WHERE position < 201"
            " ORDER BY position"
        ).fetchall()
    assert len(expected) == 200

    done = threading.Event()
    appended: list[int] = []

    def keep_appending() -> None:
        while not done.is_set():
            appended.extend(asyncio.run(_append(gcs_url, 20, f"during-{len(appended)}")))

    writer = threading.Thread(target=keep_appending)
    writer.start()
    try:
        path = manager.retire(oldest.table_name, tmp_path)
    finally:
        done.set()
        writer.join()
    assert appended, "appends kept going during the detach"

    archived = read_parquet_archive(path)
    assert archived.num_rows == 200
    rows = list(zip(*[archived.column(n).to_pylist() for n in archived.column_names], strict=True))
    assert [r[:8] for r in rows] == [r[:8] for r in expected]
    assert [json.loads(r[8]) for r in rows] == [json.loads(r[8]) for r in expected]
    assert [r[9] for r in rows] == [bytes(r[9]) for r in expected]

    states = {p.table_name: p for p in manager.partitions()}
    assert states[oldest.table_name].state == "dropped"
    assert states[oldest.table_name].archived_to == str(path)
    assert oldest.table_name not in public_tables(gcs_url)
    with psycopg.connect(gcs_url) as conn:
        assert conn.execute("SELECT min(position), count(*) FROM events").fetchone() == (
            201,
            300 + len(appended),
        )


def test_a_partition_still_receiving_appends_cannot_be_detached(gcs_url: str) -> None:
    manager = PartitionManager(gcs_url)
    manager.configure(partition_size=100, partitions_ahead=1)
    asyncio.run(_append(gcs_url, 50, "x"))
    current = manager.partitions()[0]
    with pytest.raises(GcsError, match="still receives appends"):
        manager.detach(current.table_name)
    with pytest.raises(GcsError, match="detach it before"):
        manager.drop(current.table_name)
    assert manager.partitions()[0].state == "attached"


def test_full_partitions_get_the_entity_history_index(gcs_url: str) -> None:
    manager = PartitionManager(gcs_url)
    manager.configure(partition_size=100, partitions_ahead=1)
    asyncio.run(_append(gcs_url, 250, "h"))
    assert manager.index_full_partitions() == [
        "events_p0000000000000000001",
        "events_p0000000000000000101",
    ]
    assert manager.index_full_partitions() == []  # idempotent; the hot one stays bare
    with psycopg.connect(gcs_url) as conn:
        conn.execute("ANALYZE events")
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN SELECT * FROM events WHERE entity_id = 'h-7' ORDER BY position"
            )
        )
        rows = conn.execute("SELECT entity_id FROM events WHERE entity_id = 'h-7'").fetchall()
    assert "events_p0000000000000000001_entity_idx" in plan
    assert rows == [("h-7",)]


def _index_scans(url: str) -> dict[str, int]:
    """Each partition's index scans so far, by index (what the duplicate checks read)."""
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT indexrelname, idx_scan FROM pg_stat_user_indexes WHERE relname LIKE 'events_p%'"
        ).fetchall()
    return {index: scans for index, scans in found}


def _scans_once_flushed(url: str, before: dict[str, int], index: str, at_least: int) -> dict:
    """The scans since ``before``, once a closed connection's statistics reached the
    server's (a backend flushes its own at exit): ``index``'s have grown by ``at_least``."""
    deadline = time.monotonic() + 20
    while True:
        now = _index_scans(url)
        grown = {name: now[name] - before.get(name, 0) for name in now}
        if grown.get(index, 0) >= at_least:
            return grown
        assert time.monotonic() < deadline, grown
        time.sleep(0.1)


def test_an_append_reads_only_the_partitions_that_may_hold_a_copy_of_its_events(
    gcs_url: str,
) -> None:
    """Migration 0030: the duplicate check of ids made after the partitions' seals (and
    twice the clock skew allowed) reads only the view of the partitions after them; an
    event stored before them is still found, through every partition."""
    manager = PartitionManager(gcs_url)
    manager.configure(partition_size=100, partitions_ahead=1)
    with psycopg.connect(gcs_url, autocommit=True) as conn:
        conn.execute("UPDATE event_log_head SET max_clock_skew = '0.2 seconds'")
    old = Event(EntityKind.OBJECT, "old-1", "created", {"size_bytes": 1}, job_id="job-1")

    async def append_old_then_more() -> int:
        async with EventAppender(gcs_url) as appender:
            at = await appender.append(old)
            await appender.append_many(
                Event(EntityKind.OBJECT, f"o-{n}", "created", {"size_bytes": n}, job_id="job-1")
                for n in range(349)
            )
            return at

    old_at = asyncio.run(append_old_then_more())
    assert old_at == 1
    assert manager.seal_full_partitions() == 3  # [1, 101), [101, 201), [201, 301)
    hot = manager.partitions()[3].table_name  # [301, 401): the head (350) is in it
    assert rows(gcs_url, "SELECT recent_from FROM event_log_head") == [(0,)]  # (all, yet)
    time.sleep(1.0)  # three skews after the seals: the next round moves the view past them
    assert manager.seal_full_partitions() == 0
    assert rows(gcs_url, "SELECT recent_from, recent_partitions[1] FROM event_log_head") == [
        (301, hot)
    ]

    def made(prefix: str, count: int) -> list[Event]:
        return [
            Event(EntityKind.OBJECT, f"{prefix}-{n}", "created", {"size_bytes": n}, job_id="job-1")
            for n in range(count)
        ]

    async def append_new_and_again() -> tuple[list[int], int, int, list[int], list[int]]:
        async with EventAppender(gcs_url) as appender:
            new = made("n", 20)
            positions = [await appender.append(event) for event in new]  # one at a time
            again = await appender.append(new[0])  # a copy in the hot partition: found
            old_again = await appender.append(old)  # made before the seals: all read
            batch = await appender.append_many(made("b", 10))  # the check of a batch
            mixed = await appender.append_many([new[1], *made("m", 1)])
            return positions, again, old_again, batch, mixed

    async def append_old_in_a_batch() -> list[int]:
        async with EventAppender(gcs_url) as appender:
            return await appender.append_many([*made("x", 1), old])

    before = _index_scans(gcs_url)
    positions, again, old_again, batch, mixed = asyncio.run(append_new_and_again())
    assert positions == list(range(351, 371)) and again == 351 and old_again == old_at
    assert batch == list(range(371, 381)) and mixed == [352, 381]
    grown = _scans_once_flushed(gcs_url, before, f"{hot}_event_id_idx", 23)
    sealed = [p.table_name for p in manager.partitions()[:3]]
    # the appends of ids made after the seals read no sealed partition (before 0030 each
    # read all of them); the old id's read them in order until it found it, in the first
    assert [grown[f"{name}_event_id_idx"] for name in sealed] == [1, 0, 0], grown
    # ... and only through the event_id index (0027's bound, and a first 0030's, made
    # plans that scanned a partition's primary key instead)
    assert {name: n for name, n in grown.items() if n and "event_id" not in name} == {}
    assert rows(gcs_url, "SELECT count(*) FROM events")[0][0] == 381  # nothing stored twice
    # a batch with the old id is checked in every partition, and finds it there
    assert asyncio.run(append_old_in_a_batch()) == [382, old_at]
    assert rows(gcs_url, "SELECT count(*) FROM events")[0][0] == 382


def test_a_copy_past_the_recent_partitions_is_found_in_every_partition(gcs_url: str) -> None:
    """An append that outran the upkeep made partitions itself, which the view of the
    recent partitions does not hold yet: a check whose shard's head is past the view reads
    every partition, and finds the copy there (the view alone would not)."""
    manager = PartitionManager(gcs_url)
    manager.configure(partition_size=100, partitions_ahead=1)
    with psycopg.connect(gcs_url, autocommit=True) as conn:
        conn.execute("UPDATE event_log_head SET max_clock_skew = '0.2 seconds'")
    asyncio.run(_append(gcs_url, 150, "s"))
    assert manager.seal_full_partitions() == 1  # [1, 101)
    time.sleep(1.0)
    manager.seal_full_partitions()  # the view: from 101 on
    [(view_until,)] = rows(gcs_url, "SELECT recent_until FROM event_log_shards")
    assert rows(gcs_url, "SELECT recent_from FROM event_log_head") == [(101,)]
    past = [
        Event(EntityKind.OBJECT, f"p-{n}", "created", {"size_bytes": n}, job_id="job-1")
        for n in range(view_until + 49 - 150)
    ]

    async def append_past_the_view_and_again() -> tuple[list[int], int, list[int]]:
        async with EventAppender(gcs_url) as appender:
            positions = await appender.append_many(past)
            again = await appender.append(past[-1])
            fresh = Event(EntityKind.OBJECT, "f-1", "created", {"size_bytes": 1}, job_id="job-1")
            both = await appender.append_many([past[-2], fresh])
            return positions, again, both

    positions, again, both = asyncio.run(append_past_the_view_and_again())
    assert positions[-1] == view_until + 49 > view_until  # (in a partition made by the append)
    assert again == positions[-1] and both == [positions[-2], view_until + 50]
    assert rows(gcs_url, "SELECT count(*) FROM events")[0][0] == view_until + 50
    manager.seal_full_partitions()  # the next round's view holds the appends' partitions
    assert rows(gcs_url, "SELECT recent_until FROM event_log_shards")[0][0] > view_until + 50


def test_a_partition_the_recent_view_holds_can_still_be_retired(
    gcs_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The view of the recent partitions names them: `cairn gc` takes one out of it
    before it drops it, and log_union (made again by every run of migrations) keeps no
    copy of the view that would hold the partition. An append's lock held open makes
    the drop fail, saying so, with nothing done."""
    manager = PartitionManager(gcs_url)
    manager.configure(partition_size=100, partitions_ahead=1)
    asyncio.run(_append(gcs_url, 250, "r"))
    manager.seal_full_partitions()  # (recent_from 0: the view holds them all)
    first = manager.partitions()[0].table_name
    assert rows(gcs_url, "SELECT recent_partitions[1] FROM event_log_head") == [(first,)]
    schema.upgrade(gcs_url)  # (log_union made again, as a head's start does)
    assert rows(gcs_url, "SELECT to_regclass('log_union.recent_event_ids')") == [(None,)]
    manager.detach(first)
    monkeypatch.setattr(partitions, "_DROP_LOCK_TIMEOUT", "200ms")
    with psycopg.connect(gcs_url) as holder:  # an append's transaction, left open
        holder.execute("SELECT 1 FROM event_log_shards WHERE shard = 0 FOR UPDATE")
        with pytest.raises(GcsError, match=f"partition {first} was not dropped: an append"):
            manager.drop(first)
    assert manager.partitions()[0].state == "detached"  # (nothing half done)
    manager.drop(first)
    assert first not in rows(gcs_url, "SELECT recent_partitions FROM event_log_head")[0][0]
    assert rows(gcs_url, "SELECT count(*) FROM recent_event_ids")[0][0] == 150


def test_sealing_does_not_wait_for_an_append_that_holds_its_shard(gcs_url: str) -> None:
    """An append held open (a transaction whose client is gone) keeps its shard's lock:
    the upkeep's seal gives up at once rather than hold back the other appends behind
    the shares it took, and seals on a later round."""
    manager = PartitionManager(gcs_url)
    manager.configure(partition_size=100, partitions_ahead=1)
    asyncio.run(_append(gcs_url, 150, "s"))
    with psycopg.connect(gcs_url) as holder:  # (a transaction, as an append's)
        holder.execute("SELECT 1 FROM event_log_shards WHERE shard = 0 FOR UPDATE")
        started = time.monotonic()
        assert manager.seal_full_partitions() == 0
        assert time.monotonic() - started < 5
    assert manager.seal_full_partitions() == 1  # [1, 101)


def test_an_event_id_made_ahead_of_the_servers_clock_is_refused(gcs_url: str) -> None:
    """The bound 0030 takes from an id's time holds only if no writer's clock runs ahead
    of the server's by more than max_clock_skew: such an id is refused, naming why."""
    ahead_ms = int((time.time() + 3600) * 1000)
    made_ahead = uuid.UUID(int=(ahead_ms << 80) | (0x7 << 76) | (0x2 << 62) | 12345)
    event = Event(
        EntityKind.OBJECT,
        "ahead-1",
        "created",
        {"size_bytes": 1},
        job_id="job-1",
        event_id=made_ahead,
    )

    fresh = Event(EntityKind.OBJECT, "fresh-1", "created", {"size_bytes": 1}, job_id="job-1")

    async def append(events: list[Event]) -> None:
        async with EventAppender(gcs_url) as appender:
            await appender.append_many(events)

    for events in ([event], [fresh, event]):  # alone, and in a batch (the check of each)
        with pytest.raises(GcsError, match="ahead of the GCS's clock"):
            asyncio.run(append(events))
    assert rows(gcs_url, "SELECT count(*) FROM events")[0][0] == 0
    asyncio.run(append([fresh]))  # (an id made now is not)
    assert rows(gcs_url, "SELECT count(*) FROM events")[0][0] == 1


def test_an_appender_whose_clock_runs_ahead_of_the_gcs_fails_at_its_start(
    gcs_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every id it made would be refused (above): it says so at once, naming the clocks,
    rather than fail each append."""
    real = time.time

    async def start() -> None:
        async with EventAppender(gcs_url) as appender:
            await appender.append(
                Event(EntityKind.OBJECT, "o-1", "created", {"size_bytes": 1}, job_id="job-1")
            )

    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    with pytest.raises(GcsError, match=r"clock is 3[56]\d\d\.\d s ahead of the GCS's at .*NTP"):
        asyncio.run(start())
    monkeypatch.undo()
    asyncio.run(start())  # (a clock that agrees: it starts, and appends)
    assert rows(gcs_url, "SELECT count(*) FROM events")[0][0] == 1


@pytest.mark.timeout(120)
def test_a_running_head_keeps_partitions_ahead_and_indexes_full_ones(
    gcs_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upkeep is not only at start: a long-running head creates partitions ahead of the
    appends and builds the history index of each partition that fills."""
    from workloads import square

    import sdk as ray

    monkeypatch.setenv("CAIRN_PARTITION_UPKEEP_S", "0.3")
    PartitionManager(gcs_url).configure(partition_size=200, partitions_ahead=2)
    ray.init(num_cpus=1, gcs_url=gcs_url)
    try:
        assert ray.get([square.remote(i) for i in range(150)]) == [i * i for i in range(150)]
        deadline = time.monotonic() + 30
        while True:
            with psycopg.connect(gcs_url) as conn:
                head = conn.execute("SELECT max(last_position) FROM event_log_shards").fetchone()[0]
                parts = PartitionManager(gcs_url).partitions()
                full = [p.table_name for p in parts if p.upper_bound <= head + 1]
                indexed = [
                    name
                    for name in full
                    if conn.execute("SELECT to_regclass(%s)", (f"{name}_entity_idx",)).fetchone()[0]
                ]
                sealed = conn.execute(
                    "SELECT table_name FROM event_partitions WHERE sealed_at IS NOT NULL "
                    "ORDER BY lower_bound"
                ).fetchall()
            ahead = max(p.upper_bound for p in parts) - (head + 1)
            if full and indexed == full and [r[0] for r in sealed] == full and ahead >= 400:
                break
            assert time.monotonic() < deadline, (head, full, indexed, ahead)
            time.sleep(0.2)
        assert head > 600  # several partitions filled while it ran
    finally:
        ray.shutdown()
