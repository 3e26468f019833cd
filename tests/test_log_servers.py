"""A log whose shards lie on two PostgreSQL servers (migrations/sql/0021_log_servers.up.sql,
controlplane/eventlog/servers.py): each event on its shard's server, a shard the server
does not hold refused, positions that put a cause before its effect across servers (the
writer's clock), and a merged reader that returns every event once, each effect after
its cause, and resumes from its positions without skipping what it held back."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
from conftest import TEMPLATE_DB, scratch_database, with_database
from log_rows import fetch_rows

from controlplane import schema
from controlplane.embedded_postgres import EmbeddedPostgres
from controlplane.errors import GcsError, NodeFencedError
from controlplane.eventlog import EntityKind, Event, EventAppender
from controlplane.eventlog.clock import LogClock
from controlplane.eventlog.servers import (
    ServersAppender,
    ServersTailer,
    fence_node,
    servers_head_positions,
    shard_of,
)

pytestmark = pytest.mark.timeout(120)

SHARDS = 4


@pytest.fixture(scope="module")
def second_server() -> Iterator[str]:
    """A second PostgreSQL server, with a migrated template database of its own."""
    server = EmbeddedPostgres()
    try:
        url = server.start()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
        schema.upgrade(with_database(url, TEMPLATE_DB))
        yield url
    finally:
        server.stop()


@pytest.fixture
def servers(gcs_url: str, second_server: str) -> Iterator[list[str]]:
    """One log of 4 shards on two servers: shards 0 and 2 on the first, 1 and 3 on the
    second."""
    with scratch_database(second_server, TEMPLATE_DB) as other:
        urls = [gcs_url, other]
        schema.set_log_servers(urls, SHARDS)
        yield urls


def jobs_by_shard() -> dict[int, str]:
    found: dict[int, str] = {}
    n = 0
    while len(found) < SHARDS:
        found.setdefault(shard_of(f"job-{n}", SHARDS), f"job-{n}")
        n += 1
    return found


def task(job: str, task_id: str, event_type: str = "submitted") -> Event:
    payload = {"name": "f"} if event_type == "submitted" else {"worker_id": "w"}
    return Event(EntityKind.TASK, task_id, event_type, payload, job_id=job)


async def test_the_shard_of_a_job_is_the_same_here_as_in_the_log(gcs_url: str) -> None:
    conn = await asyncpg.connect(gcs_url)
    try:
        for n in range(300):
            job = f"{n:x}-job"
            in_sql = await conn.fetchval("SELECT cairn_shard_of_v1($1, $2)", job, 7)
            assert shard_of(job, 7) == in_sql
    finally:
        await conn.close()


async def test_each_event_is_stored_on_its_shards_server(servers: list[str]) -> None:
    jobs = jobs_by_shard()
    async with ServersAppender(servers) as appender:
        batch = [task(job, f"t{shard}") for shard, job in jobs.items()]
        positions = await appender.append_many(batch)
    assert [p % SHARDS for p in positions] == list(jobs)
    for index, url in enumerate(servers):
        stored = await fetch_rows(url, "SELECT shard, entity_id FROM events ORDER BY shard")
        assert [r["shard"] for r in stored] == [s for s in range(SHARDS) if s % 2 == index]
        heads = await fetch_rows(url, "SELECT shard FROM event_log_shards ORDER BY shard")
        assert [r["shard"] for r in heads] == [s for s in range(SHARDS) if s % 2 == index]


async def test_a_server_refuses_a_shard_it_does_not_hold(servers: list[str]) -> None:
    jobs = jobs_by_shard()
    async with EventAppender(servers[0], clock=LogClock()) as first:
        with pytest.raises(GcsError, match=r"shard\(s\) \{1\} of this batch are not on this"):
            await first.append_many([task(jobs[0], "here"), task(jobs[1], "not-here")])
    assert await fetch_rows(servers[0], "SELECT * FROM events") == []


async def test_servers_named_in_another_order_are_refused(servers: list[str]) -> None:
    with pytest.raises(GcsError, match="is server 1 of 2 of its log, not server 0"):
        await ServersAppender(list(reversed(servers))).start()


def test_a_log_on_two_servers_cannot_be_resharded(servers: list[str]) -> None:
    with pytest.raises(GcsError, match="lies on 2 servers"):
        schema.set_log_shards(servers[0], 8)


async def test_an_effect_appended_on_another_server_is_past_its_cause(
    servers: list[str],
) -> None:
    """The first server's shards run far ahead; what a writer appends on the second
    after seeing an event of the first still lands past it."""
    jobs = jobs_by_shard()
    async with ServersAppender(servers) as busy:
        for round_ in range(5):
            await busy.append_many([task(jobs[0], f"busy-{round_}-{i}") for i in range(50)])
    async with (
        ServersTailer(servers) as reader,
        ServersAppender(servers, clock=reader.clock) as writer,
    ):
        seen = await reader.read(wait=5)
        while len(seen) < 250:
            seen += await reader.read(wait=5)
        cause = seen[-1]
        # without the clock, the second server's own head gives a low position
        async with EventAppender(servers[1], clock=LogClock()) as unaware:
            assert await unaware.append(task(jobs[3], "unaware")) < cause.position
        effect = await writer.append(task(jobs[1], "effect"))
        assert effect > cause.position


async def test_the_merged_reader_returns_every_event_once_each_effect_after_its_cause(
    servers: list[str],
) -> None:
    """Writers each append chains whose links alternate between the servers, each link
    appended once the one before is answered (so caused by it); the merged reader,
    stopped and resumed from its positions halfway, returns each event once and each
    link after the one before."""
    jobs = jobs_by_shard()
    chains, links = 8, 16

    async def chain(c: int, clock: LogClock) -> list[int]:
        async with ServersAppender(servers, clock=clock) as writer:
            out = []
            for link in range(links):
                job = jobs[(c + link) % SHARDS]
                out.append(await writer.append(task(job, f"c{c}-l{link}")))
                await asyncio.sleep(random.random() * 0.01)
            return out

    got: list[str] = []

    async def read_until(count: int, after: list[int] | int) -> list[int]:
        async with ServersTailer(servers, after=after, batch_size=7) as reader:
            while len(got) < count:
                got.extend(e.entity_id for e in await reader.read(wait=10))
            return reader.positions

    writers = asyncio.gather(*(chain(c, LogClock()) for c in range(chains)))
    stopped_at = await read_until(chains * links // 2, 0)
    written = await writers
    await read_until(chains * links, stopped_at)
    assert sorted(got) == sorted(f"c{c}-l{i}" for c in range(chains) for i in range(links))
    order = {entity: i for i, entity in enumerate(got)}
    for c in range(chains):
        assert [order[f"c{c}-l{i}"] for i in range(links)] == sorted(
            order[f"c{c}-l{i}"] for i in range(links)
        )
        assert written[c] == sorted(written[c])  # (and the positions say the same)


async def test_a_reader_starting_at_the_heads_reads_only_what_comes_after(
    servers: list[str],
) -> None:
    jobs = jobs_by_shard()
    async with ServersAppender(servers) as writer:
        await writer.append_many([task(job, f"old-{s}") for s, job in jobs.items()])
        heads = await servers_head_positions(servers)
        assert len(heads) == SHARDS
        async with ServersTailer(servers, after=heads) as reader:
            await writer.append_many([task(job, f"new-{s}") for s, job in jobs.items()])
            got: list[str] = []
            for _ in range(10):  # (a read that finds nothing waits 1 s: at most 10 s)
                got += [e.entity_id for e in await reader.read(wait=1)]
                if len(got) >= SHARDS:
                    break
            got += [e.entity_id for e in await reader.read(wait=0.5)]  # (and no more)
    assert sorted(got) == sorted(f"new-{s}" for s in jobs)


async def test_a_node_fenced_on_every_server_is_refused_on_each_after_its_last_events(
    servers: list[str],
) -> None:
    """A dead node's fence on a log on two servers (migrations/sql/0022): its appends are
    refused on both, nothing of them stored, and the clock of whoever appends its `dead`
    event is past every event it got in."""
    jobs = jobs_by_shard()
    async with ServersAppender(servers, writer_node="n1") as node:
        before = await node.append_many([task(job, f"before-{s}") for s, job in jobs.items()])
        clock = LogClock()
        await fence_node(servers, "n1", clock)
        assert clock.position >= max(before)
        for shard, job in jobs.items():
            with pytest.raises(NodeFencedError, match="node n1: it was declared dead"):
                await node.append(task(job, f"after-{shard}"))
    async with ServersAppender(servers, writer_node="n2") as other:
        assert len(await other.append_many([task(jobs[1], "n2"), task(jobs[2], "n2")])) == 2
    stored = [
        r["entity_id"]
        for url in servers
        for r in await fetch_rows(url, "SELECT entity_id FROM events")
    ]
    assert sorted(stored) == sorted([f"before-{s}" for s in jobs] + ["n2", "n2"])
