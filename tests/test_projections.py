"""The projection tables equal a fresh fold of the whole log, however many projectors
run and however often they restart."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from controlplane.eventlog import EntityKind, Event, EventAppender, Tailer
from controlplane.projections import TABLES, Projector, fold
from controlplane.projections.projector import decode_row, qualified

pytestmark = pytest.mark.timeout(120)

K = EntityKind


def workload(round_: int) -> list[Event]:
    r = round_
    node = f"node-{r}"
    events = [
        Event(K.NODE, node, "registered", {"address": f"10.0.0.{r}:7000", "resources": {"CPU": 2}}),
        Event(K.JOB, f"job-{r}", "submitted", {"entrypoint": "python app.py", "namespace": "ns"}),
        Event(K.JOB, f"job-{r}", "started", {}),
        Event(K.WORKER, f"worker-{r}", "started", {"pid": 100 + r}, node_id=node),
    ]
    for t in range(20):
        task = f"task-{r}-{t}"
        events += [
            Event(K.TASK, task, "submitted", {"name": f"mod.f{t % 3}"}, job_id=f"job-{r}"),
            Event(K.TASK, task, "scheduled", {"attempt": 0}, node_id=node),
            Event(K.TASK, task, "running", {"worker_id": f"worker-{r}"}, node_id=node),
        ]
        if t % 5 == 0:
            events += [
                Event(K.TASK, task, "failed", {"error": "ValueError: bad", "attempt": 0}),
                Event(K.TASK, task, "retried", {"attempt": 1}),
                Event(K.TASK, task, "running", {"worker_id": f"worker-{r}", "attempt": 1}),
            ]
        if t % 7 == 3:
            events.append(Event(K.TASK, task, "failed", {"error": "RuntimeError: x"}))
        else:
            events += [
                Event(K.TASK, task, "finished", {"output_digest": "sha256:00"}),
                Event(
                    K.OBJECT,
                    f"obj-{r}-{t}",
                    "created",
                    {"size_bytes": t * 10, "task_id": task},
                    job_id=f"job-{r}",
                    node_id=node,
                ),
            ]
    events += [
        Event(K.OBJECT, f"obj-{r}-1", "freed", {}),
        Event(K.ACTOR, f"actor-{r}", "creation_requested", {"class_name": "Counter", "name": "c"}),
        Event(K.ACTOR, f"actor-{r}", "alive", {"worker_id": f"worker-{r}"}, node_id=node),
        Event(K.ACTOR, f"actor-{r}", "restarting", {"attempt": 1}),
        Event(K.ACTOR, f"actor-{r}", "dead", {"cause": "killed"}),
        Event(K.NODE, node, "heartbeat", {"load": {"CPU": 1}}),
        Event(K.JOB, f"job-{r}", "finished", {}),
    ]
    return events


async def fold_of_whole_log(url: str) -> dict:
    events = []
    async with Tailer(url) as tailer:
        while batch := await tailer.read(wait=0.3):
            events += batch
    return fold(events)


async def projection_tables(url: str) -> dict:
    conn = await asyncpg.connect(url)
    try:
        rows = {}
        for table in TABLES.values():
            for record in await conn.fetch(f"SELECT * FROM {qualified(table)}"):
                rows[(table.name, record[table.key])] = decode_row(table, record)
        return rows
    finally:
        await conn.close()


async def test_projection_equals_fold_of_the_log(gcs_url: str) -> None:
    async with EventAppender(gcs_url) as appender:
        for r in range(3):
            await appender.append_many(workload(r))
    async with Projector(gcs_url, batch_size=37) as projector:
        head = await projector.catch_up()
    assert head > 0
    assert await projection_tables(gcs_url) == await fold_of_whole_log(gcs_url)

    conn = await asyncpg.connect(gcs_url)
    try:
        failed = await conn.fetch(
            "SELECT task_id, error FROM projection.tasks WHERE state = 'FAILED'"
        )
        assert {r["task_id"] for r in failed} == {
            f"task-{r}-{t}" for r in range(3) for t in (3, 10, 17)
        }
        retried = await conn.fetchrow("SELECT * FROM projection.tasks WHERE task_id = 'task-0-5'")
        assert (retried["state"], retried["attempt"]) == ("FINISHED", 1)
        node = await conn.fetchrow("SELECT * FROM projection.nodes WHERE node_id = 'node-1'")
        heartbeat_at = await conn.fetchval(
            "SELECT max(position) FROM events WHERE entity_id = 'node-1'"
            " AND event_type = 'heartbeat'"
        )
        assert node["state"] == "ALIVE" and node["last_position"] == heartbeat_at
        actor = await conn.fetchrow("SELECT * FROM projection.actors WHERE actor_id = 'actor-2'")
        assert (actor["state"], actor["num_restarts"], actor["death_cause"]) == (
            "DEAD",
            1,
            "killed",
        )
        assert (
            await conn.fetchval("SELECT state FROM projection.objects WHERE object_id = 'obj-0-1'")
            == "FREED"
        )
        assert (
            await conn.fetchval("SELECT state FROM projection.jobs WHERE job_id = 'job-2'")
            == "SUCCEEDED"
        )
        assert (
            await conn.fetchval("SELECT position FROM subscriptions WHERE name = 'projections'")
            == head
        )
    finally:
        await conn.close()


async def test_concurrent_and_restarted_projectors_apply_each_event_once(gcs_url: str) -> None:
    async with EventAppender(gcs_url) as appender:
        await appender.append_many(workload(0))
        async with Projector(gcs_url, batch_size=10) as first:
            await first.step(wait=1)
            await first.step(wait=1)
        # restarted: continues from its saved position, racing a second projector
        await appender.append_many(workload(1))
        async with Projector(gcs_url, batch_size=13) as a, Projector(gcs_url, batch_size=7) as b:
            await asyncio.gather(a.catch_up(), b.catch_up())
    assert await projection_tables(gcs_url) == await fold_of_whole_log(gcs_url)
