"""What one append of one event costs in CPU: the writer's process and its PostgreSQL
server's, with the log in 1 and in 8 shards, beside a plain durable one-row INSERT.

    python bench/append_cpu.py [--appends N]

On an embedded PostgreSQL made for the run (``synchronous_commit`` on, as the log
runs), one ``EventAppender`` appends N events one at a time, each awaited; the
writer's CPU is this process's (``time.process_time``), the server's is that of all
its processes (the postmaster and its children: the writer's backend, the WAL writer,
...), read from ``/proc`` before and after. An append is one call that commits twice (the
append, then its readers' wake-up in a transaction of its own: queries.sql,
``append_events_committed``). Why it matters: at batch 1 with 8 writers on
2 vCPUs the CPU binds, not the head lock (bench/README.md, "The append targets").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import asyncpg
from scale import _descendants, _proc_table  # (this directory is on sys.path when run)

from controlplane import schema
from controlplane.eventlog import EntityKind, Event, EventAppender


def _postmaster(backend_pid: int) -> int:
    return _proc_table()[backend_pid][0]


def _server_cpu_s(postmaster: int) -> float:
    """User and system CPU of a server: all its processes', and those it reaped."""
    table = _proc_table()
    _parent, own, reaped = table[postmaster]
    return own + reaped + sum(table[pid][1] for pid in _descendants(table, postmaster))


async def _appends(url: str, label: str, count: int) -> tuple[str, float, float, float]:
    async with EventAppender(url) as appender:
        await appender.append(
            Event(EntityKind.TASK, f"{label}-w", "submitted", {"name": "f"}, job_id="j")
        )
        assert appender._conn is not None
        pid = _postmaster(appender._conn.get_server_pid())
        server, client, wall = _server_cpu_s(pid), time.process_time(), time.perf_counter()
        for i in range(count):
            event = Event(EntityKind.TASK, f"{label}-{i}", "submitted", {"name": "f"}, job_id="j")
            await appender.append(event)
        wall = time.perf_counter() - wall
        return (
            label,
            (time.process_time() - client) / count,
            (_server_cpu_s(pid) - server) / count,
            wall / count,
        )


async def _inserts(url: str, count: int) -> tuple[str, float, float, float]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE bench_one_row (a bigint)")
        pid = _postmaster(conn.get_server_pid())
        server, client, wall = _server_cpu_s(pid), time.process_time(), time.perf_counter()
        for i in range(count):
            await conn.execute("INSERT INTO bench_one_row VALUES ($1)", i)
        wall = time.perf_counter() - wall
        await conn.execute("DROP TABLE bench_one_row")
    finally:
        await conn.close()
    label = "a durable one-row INSERT"
    return (
        label,
        (time.process_time() - client) / count,
        (_server_cpu_s(pid) - server) / count,
        wall / count,
    )


async def _bench(url: str, count: int) -> list[tuple[str, float, float, float]]:
    rows = [await _appends(url, "append of 1 event, 1 shard", count)]
    await asyncio.to_thread(schema.set_log_shards, url, 8)
    rows.append(await _appends(url, "append of 1 event, 8 shards", count))
    rows.append(await _inserts(url, count))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--appends", type=int, default=3000, help="appends per row")
    args = parser.parse_args(argv)
    from controlplane.gcs import Gcs
    from controlplane.gcs_url import normalize

    with Gcs(None) as gcs:
        rows = asyncio.run(_bench(normalize(gcs.owner_url), args.appends))
    print(f"{'call':<32} {'writer us':>10} {'server us':>11} {'wall us':>9}")
    for label, client, server, wall in rows:
        print(f"{label:<32} {client * 1e6:>10,.0f} {server * 1e6:>11,.0f} {wall * 1e6:>9,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
