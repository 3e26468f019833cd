"""A log whose shards lie on two PostgreSQL servers (migrations/sql/0021_log_servers.up.sql,
controlplane/eventlog/servers.py): each event on its shard's server, a shard the server
does not hold refused, positions that put a cause before its effect across servers (the
writer's clock), and a merged reader that returns every event once, each effect after
its cause, and resumes from its positions without skipping what it held back."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import asyncpg
import psycopg
import pytest
from click.testing import CliRunner
from conftest import TEMPLATE_DB, scratch_database, with_database
from log_rows import fetch_rows, wait_for_rows
from processes import ROOT, isolated_env, private_temp_dir

from controlplane import schema
from controlplane.cli import main
from controlplane.embedded_postgres import EmbeddedPostgres
from controlplane.errors import GcsError, InvalidEventError, NodeFencedError
from controlplane.eventlog import EntityKind, Event, EventAppender
from controlplane.eventlog.clock import AppendBound, LogClock
from controlplane.eventlog.partitions import PartitionManager, read_parquet_archive
from controlplane.eventlog.servers import (
    ServersAppender,
    ServersTailer,
    fence_node,
    log_head_positions,
    log_urls,
    open_appender,
    open_tailer,
    server_url,
    servers_head_positions,
    shard_of,
)
from controlplane.gcs import Gcs, check_log_servers
from controlplane.gcs_url import hosts, with_login
from controlplane.log_servers import address_of, place_log
from controlplane.membership import BOUND_AHEAD, MembershipMonitor
from controlplane.node import rpc
from controlplane.readonly_sql import run_readonly
from controlplane.sql import queries

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


def jobs_by_shard(shards: int = SHARDS) -> dict[int, str]:
    found: dict[int, str] = {}
    n = 0
    while len(found) < shards:
        found.setdefault(shard_of(f"job-{n}", shards), f"job-{n}")
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


async def test_a_gathering_merged_reader_reads_every_server_at_its_pace(
    servers: list[str],
) -> None:
    """``gather`` on a log on several servers paces the merged reader's rounds (each
    server's read within a round does not wait): the first round at once, the next
    one woken sooner waits out the rest and returns what came on both servers."""
    jobs = jobs_by_shard()
    pace = 3.0
    async with (
        ServersAppender(servers) as writer,
        ServersTailer(servers, gather=pace, poll_interval=30) as reader,
    ):
        await writer.append_many([task(jobs[0], "a0"), task(jobs[1], "b0")])
        first = await asyncio.wait_for(reader.read(), pace / 2)
        while len(first) < 2:
            first += await asyncio.wait_for(reader.read(), pace / 2)
        assert sorted(e.entity_id for e in first) == ["a0", "b0"]
        began = time.monotonic()
        second = asyncio.create_task(reader.read(wait=20))
        await writer.append(task(jobs[0], "a1"))
        await asyncio.sleep(0.2)
        assert not second.done()
        await writer.append(task(jobs[1], "b1"))
        got = await second
        assert time.monotonic() - began >= pace - 0.1
        while len(got) < 2:  # (what a round read but held back: the next round, at once)
            got += await asyncio.wait_for(reader.read(), pace / 2)
        assert sorted(e.entity_id for e in got) == ["a1", "b1"]


async def test_a_gathering_merged_reader_stops_listening_to_a_busy_server_until_it_is_quiet(
    servers: list[str],
) -> None:
    """While the merged reader's paced rounds find events on a server, that server's
    tailer stops listening (its next read comes after the pace anyway); a quiet server
    keeps listening. Once the busy one is quiet too it listens again: an append made
    then wakes the reader long before its poll."""
    jobs = jobs_by_shard()  # (jobs[0]: server 0's)
    async with (
        ServersAppender(servers) as writer,
        ServersTailer(servers, gather=0.05, poll_interval=30) as reader,
    ):
        for i in range(5):  # busy on server 0: each round finds the append made since
            await writer.append(task(jobs[0], f"busy{i}"))
            got: list[str] = []
            while not got:
                got += [e.entity_id for e in await reader.read(wait=5)]
            assert got == [f"busy{i}"]
        assert reader.listening == [False, True]
        reading = asyncio.create_task(reader.read(wait=20))
        deadline = time.monotonic() + 10
        while reader.listening != [True, True]:  # quiet: server 0's listens again
            assert time.monotonic() < deadline, reader.listening
            await asyncio.sleep(0.01)
        assert not reading.done()
        sent = time.monotonic()
        await writer.append(task(jobs[0], "later"))
        assert [e.entity_id for e in await reading] == ["later"]
        assert time.monotonic() - sent < 5  # (its poll: 30 s)


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
        deadline = time.monotonic() + 60
        async with ServersTailer(servers, after=after, batch_size=7) as reader:
            while len(got) < count:
                failed = writers.exception() if writers.done() else None
                if failed is not None:  # (a writer failed: no reader's wait for it)
                    raise failed
                assert time.monotonic() < deadline, (count, len(got), reader.positions)
                got.extend(e.entity_id for e in await reader.read(wait=1))
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


# -- the runtime on such a log (migrations/sql/0023, controlplane/log_servers.py) --------

SHARED_LOGIN = ("cairn_test_shared", "shared-secret")


@pytest.fixture(scope="module")
def shared_login(pg_server_url: str, second_server: str) -> None:
    """One login on both servers: a process logs in to every server of its log with
    server 0's (the embedded servers of a head share the runtime's)."""
    user, password = SHARED_LOGIN
    for url in (pg_server_url, second_server):
        with psycopg.connect(url, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone():
                conn.execute(f"CREATE ROLE {user} LOGIN SUPERUSER PASSWORD '{password}'")


def shared(url: str) -> str:
    return with_login(url, *SHARED_LOGIN)


def test_a_server_on_server_0s_machine_is_reached_as_server_0_is() -> None:
    """An address without a host (an embedded server of the head) takes the host, the
    login and the connection options (TLS files) a process uses for server 0: loopback
    on the head, the head's address with this machine's certificate elsewhere."""
    address = address_of("postgresql://cairn_runtime:pw@127.0.0.1:6001/cairn", on_home_machine=True)
    assert address == "postgresql://:6001/cairn"  # no login kept
    home = "postgresql://cairn_runtime:s%40cret@10.9.0.1:6000/cairn?sslmode=verify-full&sslcert=%2Fn%2Fc.pem"
    there = urlsplit(server_url(home, address))
    assert (there.hostname, there.port, there.path) == ("10.9.0.1", 6001, "/cairn")
    assert (there.username, there.password) == ("cairn_runtime", "s%40cret")
    assert dict(parse_qsl(there.query)) == {"sslmode": "verify-full", "sslcert": "/n/c.pem"}
    given = address_of(
        "postgresql://u:p@db2.example:5432/log?sslmode=require", on_home_machine=False
    )
    assert given == "postgresql://db2.example:5432/log?sslmode=require"
    elsewhere = urlsplit(server_url("postgresql://u:p@db1.example:5432/log", given))
    assert (elsewhere.hostname, elsewhere.username, elsewhere.password) == ("db2.example", "u", "p")
    # a server with its replica (--gcs-replicas 1): both ports, at each machine of server 0
    followed = address_of(
        "postgresql://r:pw@127.0.0.1:6001,127.0.0.1:6002/cairn?target_session_attrs=read-write",
        on_home_machine=True,
    )
    assert followed == "postgresql://:6001,:6002/cairn?target_session_attrs=read-write"
    pair = server_url("postgresql://r:pw@10.9.0.1:6000,10.9.0.1:6003/cairn", followed)
    assert hosts(pair) == ["10.9.0.1:6001", "10.9.0.1:6002"]
    assert dict(parse_qsl(urlsplit(pair).query)) == {"target_session_attrs": "read-write"}
    # ... with its replica on another machine (--gcs-replica-host): the same port there,
    # reached on the head through a tunnel at 127.0.0.2 on that port
    remote = address_of(
        "postgresql://r:pw@127.0.0.1:6001,127.0.0.2:6001/cairn?target_session_attrs=read-write",
        on_home_machine=True,
    )
    assert remote == "postgresql://:6001/cairn?target_session_attrs=read-write"
    on_head = server_url("postgresql://r:pw@127.0.0.1:6000,127.0.0.2:6000/cairn", remote)
    assert hosts(on_head) == ["127.0.0.1:6001", "127.0.0.2:6001"]
    elsewhere_pair = server_url("postgresql://r:pw@10.9.0.1:6000,10.9.0.2:6000/cairn", remote)
    assert hosts(elsewhere_pair) == ["10.9.0.1:6001", "10.9.0.2:6001"]


@pytest.mark.usefixtures("shared_login")
async def test_a_process_given_server_0_finds_every_server_and_reads_the_log_as_one(
    servers: list[str],
) -> None:
    """place_log names the servers on server 0 and makes its union of their events:
    the appender and tailer a process opens with server 0's URL are the servers' ones,
    and audit reads (cairn sql's entry point) see every server's events and views."""
    servers = [shared(url) for url in servers]
    place_log(servers, servers, [address_of(u, on_home_machine=False) for u in servers], SHARDS)
    assert [urlsplit(u).port for u in await log_urls(servers[0])] == [
        urlsplit(u).port for u in servers
    ]
    jobs = jobs_by_shard()
    appender = await open_appender(servers[0])
    assert isinstance(appender, ServersAppender)
    async with appender:
        for shard, job in jobs.items():
            await appender.append_many([task(job, f"t{shard}"), task(job, f"t{shard}", "running")])
    tailer = await open_tailer(servers[0])
    assert isinstance(tailer, ServersTailer)
    async with tailer:
        read: list[object] = []
        while len(read) < 2 * SHARDS:
            read += await tailer.read(wait=5)
    assert len(read) == 2 * SHARDS
    assert await log_head_positions(servers[0]) == tailer.positions
    _, rows = await run_readonly(
        servers[0], "SELECT count(*), count(DISTINCT shard), count(DISTINCT position) FROM events"
    )
    assert rows == [(2 * SHARDS, SHARDS, 2 * SHARDS)]
    _, rows = await run_readonly(servers[0], "SELECT state, count(*) FROM tasks GROUP BY state")
    assert rows == [("RUNNING", SHARDS)]
    _, rows = await run_readonly(
        servers[0],
        "SELECT count(*) FROM events WHERE entity_id = 't1'",  # (on server 1)
    )
    assert rows == [(2,)]


async def test_an_urgent_append_is_durable_after_what_was_written_behind_elsewhere(
    servers: list[str],
) -> None:
    """A node's recorder on two servers: an event that gates visibility is answered only
    once every event written behind before it is durable, on whichever server (an empty
    request on a server with a backlog: done after it)."""
    jobs = jobs_by_shard()
    async with ServersAppender(servers, linger=30.0) as appender:
        appender.write_behind([task(jobs[1], "behind")])  # server 1, lingering
        positions = await asyncio.wait_for(
            appender.enqueue([task(jobs[0], "urgent")], urgent=True), 10
        )
        assert len(positions) == 1
        assert [
            r["entity_id"] for r in await fetch_rows(servers[1], "SELECT entity_id FROM events")
        ] == ["behind"]


@pytest.mark.usefixtures("shared_login")
def test_a_gcs_given_two_urls_places_one_log_and_refuses_them_reordered(
    pg_server_url: str, second_server: str
) -> None:
    with (
        scratch_database(pg_server_url, TEMPLATE_DB) as first,
        scratch_database(second_server, TEMPLATE_DB) as second,
    ):
        first, second = shared(first), shared(second)
        with Gcs([first, second], log_shards=SHARDS) as gcs:
            assert gcs.url == first and gcs.owner_urls == [first, second]
        layouts = [schema_layout(url) for url in (first, second)]
        assert layouts == [(SHARDS, 0, 2), (SHARDS, 1, 2)]
        with Gcs([first, second]):  # the same log again: taken as it is
            pass
        with pytest.raises(GcsError, match="name the servers in the order the log was made"):
            Gcs([second, first]).start()


def test_a_log_on_several_servers_refuses_what_it_cannot_be() -> None:
    with pytest.raises(ValueError, match="each with its own --gcs-url"):
        check_log_servers(["postgresql://u@a/db"], 2)
    with pytest.raises(ValueError, match="must all name the same login"):
        check_log_servers(["postgresql://u:p@a/db", "postgresql://u:q@b/db"], 1)
    two = ["postgresql://u:p@a/db", "postgresql://u:p@b/db"]
    assert check_log_servers(two, 1) == 2
    assert check_log_servers([], 2) == 2


@pytest.mark.usefixtures("shared_login")
def test_servers_that_hold_logs_are_not_made_one(pg_server_url: str, second_server: str) -> None:
    with (
        scratch_database(pg_server_url, TEMPLATE_DB) as first,
        scratch_database(second_server, TEMPLATE_DB) as second,
    ):
        first, second = shared(first), shared(second)
        with psycopg.connect(second, autocommit=True) as conn:
            conn.execute(
                "SELECT cairn_append_v2(ARRAY[gen_random_uuid()], ARRAY[NULL::text], "
                "ARRAY['node'::entity_kind], ARRAY['n'], ARRAY['registered'], ARRAY[NULL::text], "
                "ARRAY['{}'::jsonb], ARRAY[NULL::bytea])"
            )
        with pytest.raises(GcsError, match="hold logs already"):
            Gcs([first, second]).start()


def schema_layout(url: str) -> tuple[int, int, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT shard_count, server_index, server_count FROM event_log_head"
        ).fetchone()
    assert row is not None
    return (row[0], row[1], row[2])


@pytest.mark.usefixtures("shared_login")
async def test_an_event_naming_no_job_goes_to_the_server_of_its_entitys_job(
    servers: list[str],
) -> None:
    """A node that fetched an object names no job when it frees or moves it: the appender
    finds the job in the object's events on another server (server 0's union) and sends
    the events there, in the order they were written, behind the events queued after."""
    servers = [shared(url) for url in servers]
    place_log(servers, servers, [address_of(u, on_home_machine=False) for u in servers], SHARDS)
    job = jobs_by_shard()[1]  # (shard 1: on server 1)
    made = Event(EntityKind.OBJECT, "obj", "created", {"size_bytes": 1}, job_id=job)
    async with ServersAppender(servers) as maker:
        await maker.append(made)
    async with ServersAppender(servers) as node:
        node.write_behind(
            [Event(EntityKind.OBJECT, "obj", "transferred", {"size_bytes": 1, "from_node": "a"})]
        )
        node.write_behind([task(jobs_by_shard()[0], "after")])  # (server 0: waits its turn)
        positions = await node.enqueue([Event(EntityKind.OBJECT, "obj", "freed", {})])
        assert len(positions) == 1
    on_one = await fetch_rows(
        servers[1],
        "SELECT event_type, job_id FROM events WHERE entity_id = 'obj' ORDER BY position",
    )
    assert [(r["event_type"], r["job_id"]) for r in on_one] == [
        ("created", job),
        ("transferred", job),
        ("freed", job),
    ]
    assert [
        r["entity_id"] for r in await fetch_rows(servers[0], "SELECT entity_id FROM events")
    ] == ["after"]


@pytest.mark.usefixtures("shared_login")
def test_gc_and_partitions_act_on_every_server_of_the_log(
    servers: list[str], tmp_path: Path
) -> None:
    """`cairn gc` given server 0's URL retires the old full partitions of each server
    (each its own, of its own positions; archives kept apart per server), `cairn
    partitions list` shows each server's, and `cairn migrate` migrates each."""
    servers = [shared(url) for url in servers]
    place_log(servers, servers, [address_of(u, on_home_machine=False) for u in servers], SHARDS)
    for url in servers:
        PartitionManager(url).configure(partition_size=40, partitions_ahead=1)
    jobs = jobs_by_shard()

    async def append(rounds: int) -> None:
        async with ServersAppender(servers) as appender:
            for r in range(rounds):
                job = jobs[r % SHARDS]
                await appender.append_many([task(job, f"r{r}-t{i}") for i in range(10)])

    asyncio.run(append(24))  # (120 events on each server)
    count = "SELECT count(*) AS n FROM events"
    before = [asyncio.run(fetch_rows(url, count))[0]["n"] for url in servers]
    for url in servers:  # (every event older than the cutoff, by each server's clock)
        wait_for_rows(
            url, "SELECT 1 FROM events HAVING clock_timestamp() - max(recorded_at) > '1 s'"
        )
    gc = ["gc", "--older-than", "1s", "--gcs-url", servers[0], "--archive", str(tmp_path)]
    result = CliRunner().invoke(main, gc)
    assert result.exit_code == 0, result.output
    assert "server 0: retired" in result.output and "server 1: retired" in result.output
    for index, url in enumerate(servers):
        after = asyncio.run(fetch_rows(url, count))[0]["n"]
        archives = (tmp_path / f"server-{index}").glob("*.parquet")
        archived = sum(read_parquet_archive(path).num_rows for path in archives)
        assert archived == before[index] - after > 0, index
    listed = CliRunner().invoke(main, ["partitions", "list", "--gcs-url", servers[0]])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    one = lines.index("server 1:")
    assert lines[0] == "server 0:" and "dropped" in " ".join(lines[1:one])
    assert "dropped" in " ".join(lines[one + 1 :])
    asyncio.run(append(2))  # (appends go on, on both servers)
    migrated = CliRunner().invoke(main, ["migrate", "--gcs-url", servers[0]])
    assert migrated.exit_code == 0 and "schema at head on 2 servers" in migrated.output


async def test_calls_between_nodes_carry_each_sides_log_clock() -> None:
    """A call between nodes moves the callee's clock past the caller's before its
    handler runs, and its answer the caller's past what the callee saw or appended
    before answering (raw calls, the object reads, too): an event either appends
    after a call lands past the other's causes, on whichever server."""
    callee, caller = LogClock(40), LogClock(7)

    def info(_request: dict[str, object]) -> dict[str, object]:
        on_entry = callee.position
        callee.saw(500)  # (as if it appended while answering)
        return {"on_entry": on_entry}

    async def read(_request: dict[str, object]) -> bytes:
        return b"bytes"

    server, port = await rpc.serve(
        "127.0.0.1", 0, {"Info": info}, {"Read": read}, token=None, clock=callee
    )
    try:
        link, address = rpc.Link(caller), f"127.0.0.1:{port}"
        caller.saw(90)
        assert await link.unary(address, "Info")({}) == {"on_entry": 90}
        assert caller.position == 500
        caller.saw(900)
        assert await link.raw(address, "Read")({}) == b"bytes"
        assert callee.position == 900
    finally:
        await server.stop(None)
        await rpc.close_channels()


def test_the_head_starts_again_each_server_of_its_log_that_stops_by_itself() -> None:
    """Without replicas, the head starts again any embedded server of the log that
    stopped by itself (a PANIC on a full disk; here a shutdown it was not asked for),
    saying which, and appends to its shards go through again."""
    gcs = Gcs(log_servers=2, log_shards=2)
    try:
        gcs.start()
        (one,) = gcs.other_log_servers
        os.kill(one.pid or 0, signal.SIGTERM)  # (PostgreSQL shuts down, exit code 0)
        said: list[str] = []
        deadline = time.monotonic() + 60
        while not any("runs again" in line for line in said):
            assert time.monotonic() < deadline, said
            said += (gcs.keep_running() or "").splitlines()
            time.sleep(0.1)
        assert any("the GCS's server 1 (PostgreSQL) stopped by itself" in s for s in said), said
        assert not any(s.startswith("the GCS's PostgreSQL") for s in said), said

        async def append() -> int:
            async with ServersAppender(await log_urls(gcs.url)) as appender:
                return await appender.append(task(jobs_by_shard(2)[1], "after"))

        assert asyncio.run(append()) > 0
    finally:
        gcs.stop()


async def test_a_batch_for_two_servers_with_an_invalid_event_writes_nothing(
    servers: list[str],
) -> None:
    """The whole batch is checked before any server queues its part: an invalid event
    bound for server 1 keeps the valid one bound for server 0 out too (append_many and
    enqueue alike)."""
    jobs = jobs_by_shard()
    bad = Event(EntityKind.TASK, "bad", "submitted", {}, job_id=jobs[1])  # (no name)
    async with ServersAppender(servers) as appender:
        with pytest.raises(InvalidEventError, match="missing required field 'name'"):
            await appender.append_many([task(jobs[0], "good"), bad])
        with pytest.raises(InvalidEventError, match="missing required field 'name'"):
            appender.enqueue([task(jobs[0], "good"), bad])
        assert await appender.append_many([task(jobs[0], "after"), task(jobs[1], "after")])
    for url in servers:
        rows = await fetch_rows(url, "SELECT entity_id FROM events")
        assert [r["entity_id"] for r in rows] == ["after"]


@pytest.fixture
def log_with_a_stoppable_server(gcs_url: str) -> Iterator[tuple[list[str], EmbeddedPostgres]]:
    """A log of two shards on two servers, the second one of this test's own (to stop
    and start again): the URLs, and that server."""
    server = EmbeddedPostgres()
    try:
        one = server.start()
        schema.upgrade(one)
        urls = [gcs_url, one]
        schema.set_log_servers(urls, 2)
        yield urls, server
    finally:
        server.stop()


async def test_a_server_that_stays_away_holds_back_only_its_own_events(
    gcs_url: str, log_with_a_stoppable_server: tuple[list[str], EmbeddedPostgres]
) -> None:
    """Server 1 of two stops (no replica) for longer than a reader rides out an outage:
    the merged reader returns server 0's events after ``away_after`` and goes on, raising
    nothing; an appender's urgent batch on server 0 is not held by what it wrote behind
    to server 1, nor its job lookups by server 1's silence. Once server 1 is back, what
    was written behind there lands and is read, after, and every event is read once."""
    urls, server = log_with_a_stoppable_server
    jobs = jobs_by_shard(2)  # (shard s on server s)
    got: list[str] = []
    async with (
        ServersAppender(urls, away_after=1.0, unavailable_timeout=1) as writer,
        ServersTailer(urls, away_after=1.0, unavailable_timeout=1, poll_interval=0.1) as reader,
    ):

        async def read_until(entity: str, times: int = 1) -> None:
            deadline = time.monotonic() + 30
            while got.count(entity) < times:
                assert time.monotonic() < deadline, (entity, got)
                got.extend(e.entity_id for e in await reader.read(wait=1))

        made = Event(EntityKind.OBJECT, "obj-0", "created", {"size_bytes": 1}, job_id=jobs[0])
        await writer.append_many([task(jobs[0], "before-0"), task(jobs[1], "before-1"), made])
        await read_until("before-1")
        assert reader.away == set()

        server.stop(keep_data=True)
        writer.write_behind([task(jobs[1], "behind-1")])  # (waits for server 1)
        urgent = writer.enqueue([task(jobs[0], "during-0")])
        assert len(await asyncio.wait_for(urgent, 20)) == 1
        freed = Event(EntityKind.OBJECT, "obj-0", "freed", {})  # (its job: on server 0)
        assert len(await asyncio.wait_for(writer.enqueue([freed]), 20)) == 1
        await read_until("during-0")
        await read_until("obj-0", 2)
        assert reader.away == {1}
        await asyncio.sleep(2)  # (past the reader's riding out of server 1: it goes on)
        await writer.append(task(jobs[0], "later-0"))
        await read_until("later-0")
        assert reader.away == {1}

        server.start()
        await writer.append(task(jobs[1], "after-1"))
        await read_until("after-1")
        await read_until("behind-1")
        assert reader.away == set()
    assert sorted(got) == sorted(
        ["before-0", "before-1", "behind-1", "during-0", "later-0", "after-1", "obj-0", "obj-0"]
    )
    assert got.index("during-0") < got.index("behind-1")  # (away: read when back)
    on_zero = await fetch_rows(gcs_url, "SELECT job_id FROM events WHERE entity_id = 'obj-0'")
    assert [r["job_id"] for r in on_zero] == [jobs[0], jobs[0]]


async def test_a_job_only_an_away_server_can_name_holds_back_only_its_entitys_events(
    gcs_url: str, log_with_a_stoppable_server: tuple[list[str], EmbeddedPostgres]
) -> None:
    """A node frees an object it did not make, whose job's shard lies on server 1, while
    server 1 is stopped: no answering server can name the job, so the lookup rides out
    the outage as what is queued for server 1 does (it is not dropped after
    ``unavailable_timeout``), and after ``away_after`` the node's later batches go on
    without it but for one of the same object, which waits behind it. Once server 1 is
    back both land there, in the order they were written."""
    urls, server = log_with_a_stoppable_server
    jobs = jobs_by_shard(2)  # (shard s on server s)

    def obj(object_id: str, event_type: str, job: str | None = None) -> Event:
        payload = {"size_bytes": 1} if event_type == "created" else {}
        return Event(EntityKind.OBJECT, object_id, event_type, payload, job_id=job)

    async with ServersAppender(urls) as maker:
        made = [obj("obj-1", "created", jobs[1]), obj("obj-0", "created", jobs[0])]
        await maker.append_many(made)
    server.stop(keep_data=True)
    async with ServersAppender(urls, away_after=0.5, unavailable_timeout=30) as node:
        node.write_behind([obj("obj-1", "freed")])
        again = node.enqueue([Event(EntityKind.OBJECT, "obj-1", "lost", {"reason": "gone"})])
        during = await asyncio.wait_for(node.enqueue([task(jobs[0], "during-0")]), 10)
        freed = await asyncio.wait_for(node.enqueue([obj("obj-0", "freed")]), 10)
        assert len(during) == len(freed) == 1
        assert not again.done()  # (behind the freeing of the same object)
        server.start()
        assert len(await asyncio.wait_for(again, 60)) == 1
    on_one = await fetch_rows(
        urls[1], "SELECT event_type, job_id FROM events WHERE entity_id = 'obj-1' ORDER BY position"
    )
    assert [(r["event_type"], r["job_id"]) for r in on_one] == [
        ("created", jobs[1]),
        ("freed", jobs[1]),
        ("lost", jobs[1]),
    ]
    on_zero = await fetch_rows(
        gcs_url, "SELECT entity_id, event_type FROM events ORDER BY position"
    )
    assert [(r["entity_id"], r["event_type"]) for r in on_zero] == [
        ("obj-0", "created"),
        ("during-0", "submitted"),
        ("obj-0", "freed"),
    ]


# A driver on a log on two servers reads the state API, then asks for a task: the task's
# events land past what the answer was read from, though its daemon never read that.
READ_THEN_ASK = """
import asyncio, json
import sdk as ray
from sdk.util import state
from controlplane.eventlog import EntityKind, Event
from controlplane.eventlog.clock import LogClock
from controlplane.eventlog.servers import ServersAppender, log_urls, shard_of

ray.init(num_cpus=1)
while shard_of(ray.get_runtime_context().get_job_id(), 2) != 0:  # (heartbeats: shard 0)
    ray.shutdown()
    ray.init(num_cpus=1)
url = ray.get_runtime_context().gcs_address
other_job = next(f"job-{n}" for n in range(100) if shard_of(f"job-{n}", 2) == 1)


async def far_ahead():  # another process's event, past a clock this node never saw
    async with ServersAppender(await log_urls(url), clock=LogClock(10_000_000)) as other:
        event = Event(EntityKind.TASK, "elsewhere", "submitted", {"name": "g"}, job_id=other_job)
        return await other.append(event)


async def submitted(task_ids):
    from controlplane.eventlog.connection import connect
    conn = await connect(url)
    try:
        return [await conn.fetchval(
            "SELECT position FROM log_union.events WHERE entity_id = $1 "
            "AND event_type = 'submitted'", task_id) for task_id in task_ids]
    finally:
        await conn.close()


@ray.remote
def f():
    return 1


ahead = asyncio.run(far_ahead())
before = f.remote()
assert ray.get(before) == 1
assert any(t.task_id == before.task_id().hex() for t in state.list_tasks())
after = f.remote()
assert ray.get(after) == 1
print(json.dumps([ahead, *asyncio.run(submitted([before.task_id().hex(), after.task_id().hex()]))]))
"""


@pytest.mark.timeout(180)
def test_what_a_driver_asks_for_after_reading_the_state_api_is_past_what_it_read() -> None:
    tmp = private_temp_dir()
    try:
        env = isolated_env(tmp, CAIRN_LOG_SERVERS="2", CAIRN_LOG_SHARDS="2")
        done = subprocess.run(
            [sys.executable, "-c", READ_THEN_ASK],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        ahead, before, after = json.loads(done.stdout.strip().splitlines()[-1])
        assert before < ahead < after  # (before the read, its daemon was behind)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def test_the_scheduler_places_the_other_servers_jobs_while_one_is_away(
    gcs_url: str, log_with_a_stoppable_server: tuple[list[str], EmbeddedPostgres]
) -> None:
    """A scheduler on a log on two servers whose server 1 stops: an append that waits
    for it holds the scheduler for ``away_after`` only (it lands once server 1 is back),
    server 0's spills are placed meanwhile, and a spill of server 1's job read while it
    is away waits, pending, until it is back."""
    from controlplane.eventlog import SCHEDULER
    from controlplane.scheduler import GlobalScheduler

    urls, server = log_with_a_stoppable_server
    jobs = jobs_by_shard(2)

    def spill(task_id: str, job: str) -> Event:
        payload = {"attempt": 0, "resources": {"CPU": 0.1}, "args": {}, "from_node": "a"}
        return Event(EntityKind.TASK, task_id, "spilled", payload, job_id=job)

    registered = Event(
        EntityKind.NODE,
        "a",
        "registered",
        {"address": "127.0.0.1:1", "resources": {"CPU": 4.0}},
        node_id="a",
    )
    async with ServersAppender(urls) as writer:
        await writer.append_many(
            [registered, spill("s0", jobs[0]), spill("s1", jobs[1]), spill("s3", jobs[1])]
        )
    scheduler = GlobalScheduler(gcs_url)
    scheduler.appender = ServersAppender(urls, away_after=0.5, unavailable_timeout=1)
    tailer = ServersTailer(
        urls, reader=SCHEDULER, away_after=0.5, unavailable_timeout=1, poll_interval=0.1
    )
    scheduler.tailer = tailer
    await scheduler.appender.start()
    try:
        async with tailer:
            later = None
            while later is None or "s1" not in scheduler.pending:
                for event in await tailer.read(wait=5):
                    if event.entity_id == "s3":
                        later = event  # (applied once server 1 is away)
                    else:
                        scheduler.apply(event)
            server.stop(keep_data=True)
            await asyncio.wait_for(scheduler.place_pending(), 20)
            assert len(scheduler.appending) == 1  # (s1's placement: on server 1)
            placed_s0 = "SELECT 1 FROM events WHERE entity_id = 's0' AND event_type = 'placed'"
            while not await fetch_rows(gcs_url, placed_s0):
                await asyncio.sleep(0.05)
            while tailer.away != {1}:
                for event in await tailer.read(wait=1):  # (s0's placement)
                    scheduler.apply(event)
            assert later is not None
            scheduler.apply(later)
            await asyncio.wait_for(scheduler.place_pending(), 20)
            assert "s3" in scheduler.pending and len(scheduler.appending) == 1

            server.start()
            deadline = time.monotonic() + 30
            while scheduler.appending:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
                scheduler._check_appends()
            while tailer.away:
                for event in await tailer.read(wait=1):
                    scheduler.apply(event)
            await scheduler.place_pending()
            assert "s3" not in scheduler.pending
    finally:
        await scheduler.appender.close()
    placed = await fetch_rows(
        urls[1], "SELECT entity_id FROM events WHERE event_type = 'placed' ORDER BY position"
    )
    assert [r["entity_id"] for r in placed] == ["s1", "s3"]


async def test_a_reader_and_a_writer_start_while_a_server_is_away(
    log_with_a_stoppable_server: tuple[list[str], EmbeddedPostgres],
) -> None:
    """With server 1 down, a new writer and a new reader starting at the heads
    (``away_ok``: server 1's shards at the highest head of the others) start, and go on
    with server 0; once server 1 is back, what a writer that saw the reader's start
    appends there is read, and nothing from before the start is."""
    from controlplane.errors import GcsUnavailableError

    urls, server = log_with_a_stoppable_server
    jobs = jobs_by_shard(2)
    async with ServersAppender(urls) as writer:
        await writer.append_many([task(jobs[0], "old-0"), task(jobs[1], "old-1")])
    server.stop(keep_data=True)
    with pytest.raises(GcsUnavailableError):
        await servers_head_positions(urls)
    heads = await servers_head_positions(urls, away_ok=True)
    assert heads == [heads[0]] * 2  # (server 1's shard: the highest of the others)
    clock = LogClock()
    got: list[str] = []
    async with (
        ServersAppender(urls, clock=clock, away_after=0.5) as writer,
        ServersTailer(urls, after=heads, clock=clock, away_after=0.5, poll_interval=0.1) as reader,
    ):
        await writer.append(task(jobs[0], "new-0"))
        while "new-0" not in got:
            got.extend(e.entity_id for e in await reader.read(wait=5))
        assert reader.away == {1}
        server.start()
        await writer.append(task(jobs[1], "new-1"))  # (past what the reader saw)
        deadline = time.monotonic() + 30
        while "new-1" not in got:
            assert time.monotonic() < deadline, got
            got.extend(e.entity_id for e in await reader.read(wait=1))
    assert got == ["new-0", "new-1"]


def test_audit_queries_answer_without_a_server_that_does_not_answer(tmp_path: Path) -> None:
    """With server 1 down, `cairn sql` through the union fails naming it and saying how
    to go on; with --without-server 1 it answers from server 0 (its events and every view
    over them), saying what the answer lacks; so do `cairn list`, `cairn timeline` (a
    job of server 0: its whole trace), `cairn state --at` and `cairn lineage`; the union
    is whole again once it is back."""
    jobs = jobs_by_shard(2)
    with Gcs(log_servers=2) as gcs:  # (a head's embedded log on two servers)
        server = gcs.other_log_servers[0]

        async def append() -> None:
            async with await open_appender(gcs.url) as writer:
                await writer.append_many(
                    [task(jobs[0], f"home-{n}") for n in range(3)]
                    + [task(jobs[1], f"away-{n}") for n in range(2)]
                )

        asyncio.run(append())
        per_job = "SELECT job_id, count(*) AS n FROM events GROUP BY job_id ORDER BY job_id"

        def sql(*args: str) -> tuple[int, str, str]:
            result = CliRunner().invoke(
                main, ["sql", "--gcs-url", gcs.url, "--format", "json", *args]
            )
            return result.exit_code, result.stdout, result.stderr

        code, whole, _ = sql(per_job)
        assert code == 0 and json.loads(whole) == sorted(
            [{"job_id": jobs[0], "n": 3}, {"job_id": jobs[1], "n": 2}],
            key=lambda r: str(r["job_id"]),
        )
        server.stop(keep_data=True)
        try:
            code, _, said = sql(per_job)
            assert code != 0
            assert "server 1 of the log does not answer" in said and "--without-server 1" in said
            code, partial, said = sql("--without-server", "1", per_job)
            assert code == 0 and json.loads(partial) == [{"job_id": jobs[0], "n": 3}], said
            assert "without server(s) 1 of the log" in said
            code, tasks, _ = sql("--without-server", "1", "SELECT count(*) AS n FROM tasks")
            assert code == 0 and json.loads(tasks) == [{"n": 3}]  # (a view over the events)
            code, _, said = sql("--without-server", "2", per_job)
            assert code != 0 and "no server 2 to leave out" in said

            async def twice_in_one_session() -> int:  # (the log's events, not its own view)
                conn = await asyncpg.connect(gcs.url)
                try:
                    for _ in range(2):
                        await conn.execute("SELECT cairn_log_union_without_v1('{1}')")
                    return int(await conn.fetchval("SELECT count(*) FROM events"))
                finally:
                    await conn.close()

            assert asyncio.run(twice_in_one_session()) == 3
            # the state CLI and a job's timeline read the union too
            listing = ["list", "tasks", "--gcs-url", gcs.url, "--format", "json"]
            listed = CliRunner().invoke(main, listing)
            assert listed.exit_code != 0 and "--without-server 1" in listed.stderr
            listed = CliRunner().invoke(main, [*listing, "--without-server", "1"])
            assert listed.exit_code == 0, listed.output
            assert sorted(t["task_id"] for t in json.loads(listed.stdout)) == [
                f"home-{n}" for n in range(3)
            ]
            trace = str(tmp_path / "trace.json")
            timeline = ["timeline", jobs[0], "-o", trace, "--gcs-url", gcs.url]
            drawn = CliRunner().invoke(main, timeline)
            assert drawn.exit_code != 0 and "--without-server 1" in drawn.stderr
            drawn = CliRunner().invoke(main, [*timeline, "--without-server", "1"])
            assert drawn.exit_code == 0 and f"of job {jobs[0]}" in drawn.stdout  # (all of it)
            now = datetime.now(UTC).isoformat()
            at = ["state", "--at", now, "--gcs-url", gcs.url, "--json"]
            then = CliRunner().invoke(main, at)
            assert then.exit_code != 0 and "--without-server 1" in then.stderr
            then = CliRunner().invoke(main, [*at, "--without-server", "1"])
            assert then.exit_code == 0, then.output
            tasks_then = sorted(t["task_id"] for t in json.loads(then.stdout)["tasks"])
            assert tasks_then == [f"home-{n}" for n in range(3)]
            unknown = ["lineage", "0" * 40, "--gcs-url", gcs.url]
            traced = CliRunner().invoke(main, unknown)
            assert traced.exit_code != 0 and "--without-server 1" in traced.stderr
            traced = CliRunner().invoke(main, [*unknown, "--without-server", "1"])
            assert traced.exit_code != 0 and "no object" in traced.stderr  # (read: not there)
        finally:
            server.start()
        code, whole_again, _ = sql(per_job)  # (the views left out were the session's alone)
        assert code == 0 and whole_again == whole


async def test_a_merged_reader_opened_while_server_0_restarts_starts_once_it_is_back() -> None:
    """A merged reader opened while server 0 (the home: the list of servers, the layout)
    does not answer waits for it, as its reads do, instead of failing at once; then it
    reads both servers' events."""
    jobs = jobs_by_shard(2)
    with Gcs(log_servers=2) as gcs:  # (a head's embedded log on two servers)
        home = gcs.embedded
        assert home is not None
        await asyncio.to_thread(home.stop, keep_data=True)

        async def first_reads() -> list[str]:
            async with await open_tailer(gcs.url, poll_interval=0.2) as reader:
                assert isinstance(reader, ServersTailer)
                got: list[str] = []
                while len(got) < 2:
                    got += [e.entity_id for e in await reader.read(wait=20)]
                return sorted(got)

        opening = asyncio.create_task(first_reads())
        await asyncio.sleep(1.5)  # down for a while: the reader is still opening
        assert not opening.done(), opening.exception()
        await asyncio.to_thread(home.start)
        async with await open_appender(gcs.url) as writer:
            await writer.append_many([task(jobs[0], "on-0"), task(jobs[1], "on-1")])
        assert await asyncio.wait_for(opening, 60) == ["on-0", "on-1"]


# -- a node's death while a server is away (migrations/sql/0032_append_bounds.up.sql) ------


async def test_a_nodes_appends_to_another_server_stay_below_its_bound(servers: list[str]) -> None:
    """A writer node's append to server 1 that would pass its bound is refused there,
    nothing stored, and waits until the bound is renewed past it (its clock moved past
    what it reached, as the next ping's bound will)."""
    jobs = jobs_by_shard()  # (shards 1 and 3 on server 1)
    bound = AppendBound(max(await servers_head_positions(servers)))
    async with ServersAppender(servers, writer_node="n1", bound=bound) as node:
        held = asyncio.ensure_future(node.append(task(jobs[1], "held")))
        await asyncio.sleep(0.5)
        assert not held.done()
        assert await fetch_rows(servers[1], "SELECT 1 FROM events WHERE entity_id = 'held'") == []
        reached = node.clock.position  # (moved past what the refused append reached)
        assert bound.position is not None and reached >= bound.position
        bound.renewed(reached + BOUND_AHEAD)
        position = await asyncio.wait_for(held, 10)
        assert bound.position is not None and reached < position < bound.position
    stored = await fetch_rows(servers[1], "SELECT position FROM events WHERE entity_id = 'held'")
    assert [r["position"] for r in stored] == [position]


async def test_a_node_is_declared_dead_while_a_server_is_away_past_what_it_got_in_there() -> None:
    """A node goes silent while server 1 of two does not answer: the monitor declares it
    dead at once (before, it waited for server 1), its `dead` event past the node's
    bound and naming the fence owed on server 1. The node's appends to server 1 until
    that fence is placed lie below its `dead` event; once server 1 answers the fence is
    placed, and they are refused there too."""
    jobs = jobs_by_shard(2)  # (shard s on server s)
    with Gcs(log_servers=2) as gcs:
        server = gcs.other_log_servers[0]
        urls = await log_urls(gcs.url)
        clock, bound = LogClock(), AppendBound()
        conn = await asyncpg.connect(gcs.url)
        try:
            below = await conn.fetchval(
                queries["register_liveness"], "n-gone", "127.0.0.1:1", 0, BOUND_AHEAD
            )
        finally:
            await conn.close()
        bound.renewed(below)
        async with ServersAppender(urls, clock=clock, writer_node="n-gone", bound=bound) as node:
            await node.append_many([task(jobs[0], "t-0"), task(jobs[1], "t-1")])
            server.stop(keep_data=True)
            silent = "UPDATE node_liveness SET last_ping = clock_timestamp() - interval '10 s'"
            await fetch_rows(gcs.url, silent)  # (its pings stopped long ago)
            monitor = MembershipMonitor(gcs.url, dead_after=1.5)
            assert await asyncio.wait_for(monitor.check_once(), 20) == ["n-gone"]
            [dead] = await fetch_rows(
                gcs.url,
                "SELECT position, payload FROM events WHERE entity_kind = 'node' "
                "AND event_type = 'dead' AND entity_id = 'n-gone'",
            )
            assert dead["position"] > below
            assert json.loads(dead["payload"])["fence_owed_on"] == [1]
            owed = await fetch_rows(gcs.url, "SELECT node_id, server_index FROM node_fences_owed")
            assert [(r["node_id"], r["server_index"]) for r in owed] == [("n-gone", 1)]
            assert await monitor.place_owed_fences() == []  # (still away)
            server.start()
            late = await asyncio.wait_for(node.append(task(jobs[1], "late-1")), 30)
            assert late < dead["position"]  # (before its death, as the fold reads it)
            assert await monitor.place_owed_fences() == [("n-gone", 1)]
            await monitor.close()
            assert await fetch_rows(gcs.url, "SELECT 1 FROM node_fences_owed") == []
            with pytest.raises(NodeFencedError):
                await asyncio.wait_for(node.append(task(jobs[1], "after-1")), 30)
            with pytest.raises(NodeFencedError):
                await asyncio.wait_for(node.append(task(jobs[0], "after-0")), 30)
        on_one = await fetch_rows(urls[1], "SELECT entity_id FROM events ORDER BY position")
        assert [r["entity_id"] for r in on_one] == ["t-1", "late-1"]
