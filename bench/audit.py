"""The audit tools on a large log: the worked SQL examples of docs/sql.md, the lineage of
an object 1,000 levels deep, and ``cairn state --at``, on a log of 10^6 task events.

    python bench/audit.py [--gcs-url URL] [--tasks N] [--repeat R]

The log is written in one SQL statement (bench/audit.sql: generate_series; 250,000
tasks over 10 jobs, 20 functions and 8 nodes, a task submitted every 4 ms; every 100th
task fails its first attempt and is retried, every 1,000th fails; tasks 1..1000 form a
chain, each taking the previous one's result; node-07 dies 60% of the way in, and the
tasks running on it are retried elsewhere), followed by what a running cluster does:
the history index on the full partition (PartitionManager.index_full_partitions) and
ANALYZE. Each query then runs ``--repeat`` times through ``run_readonly`` (what
``cairn sql`` runs); the first and the best time are printed. Target: under 1 s each.

Without ``--gcs-url`` an embedded PostgreSQL is started and removed afterwards; with a
URL, point it at a scratch database (the events stay: the log is append-only).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane import schema  # noqa: E402
from controlplane.embedded_postgres import EmbeddedPostgres  # noqa: E402
from controlplane.eventlog.partitions import PartitionManager  # noqa: E402
from controlplane.gcs_url import normalize, redact  # noqa: E402
from controlplane.readonly_sql import run_readonly  # noqa: E402
from controlplane.sql import load_queries  # noqa: E402

GENERATOR = load_queries(ROOT / "bench" / "audit.sql")
CHAIN = 1000
START = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
TARGET_S = 1.0


def task_id(i: int) -> str:
    """The id bench/audit.sql gives task number i."""
    return hashlib.md5(f"task{i}".encode()).hexdigest()


def worked_queries() -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_sql_views import doc_queries

    return doc_queries()


async def build_log(url: str, tasks: int) -> dict[str, Any]:
    """Writes the synthetic log; returns its size."""
    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        await conn.execute("SELECT cairn_ensure_partitions_v1($1)", tasks * 5)
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM event_log_shards WHERE shard = 0 FOR UPDATE")
            await conn.execute(GENERATOR["bench_events"], tasks, START, CHAIN, tasks * 6 // 10)
            await conn.execute(GENERATOR["bench_move_head"])
        written = time.perf_counter() - started
        indexed = await asyncio.to_thread(PartitionManager(url).index_full_partitions)
        await conn.execute("ANALYZE events")
        size = dict(await conn.fetchrow(GENERATOR["bench_log_size"]))
        size["seconds"] = time.perf_counter() - started
        size["write_seconds"] = written
        size["indexed"] = indexed
        return size
    finally:
        await conn.close()


async def timed(run: Callable[[], Awaitable[Any]], repeat: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = await run()
        times.append(time.perf_counter() - started)
    return times, result


async def measure(url: str, repeat: int, tasks: int) -> list[tuple[str, list[float], str]]:
    queries = worked_queries()
    retried = task_id(50)  # every 100th task is retried (i % 100 == 50)
    cases: list[tuple[str, str, list[str], Callable[[Any], str]]] = [
        (
            "(a) why did task X run twice",
            queries["why_task_ran_twice"],
            [retried],
            lambda rows: " -> ".join(r[1] for r in rows),
        ),
        (
            "(b) inputs and code of object Y (depth 1,000)",
            queries["inputs_and_code"],
            [task_id(CHAIN) + "00000001"],
            lambda rows: f"{len(rows)} rows, max depth {max(r[0] for r in rows)}",
        ),
        (
            "(c) node-07's last minute",
            queries["node_last_minute"],
            ["node-07"],
            lambda rows: f"{len(rows)} attempts, {sum(r[6] == 'RETRIED' for r in rows)} cut short",
        ),
        (
            "(d) slowest functions by p95",
            queries["slowest_functions"],
            [],
            lambda rows: f"top: {rows[0][0]} p95 {rows[0][5]}",
        ),
        (
            "lineage() of an object 1,000 deep",
            "SELECT * FROM lineage($1)",
            [task_id(CHAIN) + "00000001"],
            lambda rows: f"{len(rows)} rows",
        ),
    ]
    results = []
    for label, statement, params, describe in cases:
        times, (_, rows) = await timed(
            lambda s=statement, p=params: run_readonly(url, s, p), repeat
        )
        results.append((label, times, describe(rows)))
    results.append(await measure_state_at(url, repeat, tasks))
    return results


async def measure_state_at(url: str, repeat: int, tasks: int) -> tuple[str, list[float], str]:
    try:
        from controlplane.state_at import state_at_async
    except ImportError:
        return ("state --at (TODO: controlplane/state_at.py missing)", [], "not measured")
    middle = START + dt.timedelta(milliseconds=4 * tasks // 2)
    times, state = await timed(lambda: state_at_async(url, timestamp=middle), repeat)
    return (f"state --at {middle:%H:%M:%S} (mid-log)", times, f"{len(state)} sections")


def report(size: dict[str, Any], results: list[tuple[str, list[float], str]]) -> bool:
    print(
        f"log: {size['events']:,} events ({size['task_events']:,} task events), "
        f"{size['table_bytes'] / 2**20:,.0f} MiB with indexes; written in "
        f"{size['write_seconds']:.1f} s, history index + ANALYZE in "
        f"{size['seconds'] - size['write_seconds']:.1f} s"
    )
    print(f"{'query':50} {'first':>8} {'best':>8}  result")
    ok = True
    for label, times, what in results:
        if not times:
            print(f"{label:50} {'-':>8} {'-':>8}  {what}")
            continue
        best = min(times)
        ok &= best < TARGET_S
        flag = "" if best < TARGET_S else "  (over 1 s)"
        print(f"{label:50} {times[0]:8.3f} {best:8.3f}  {what}{flag}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gcs-url", default=None)
    parser.add_argument("--tasks", type=int, default=250_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    server = None
    if args.gcs_url:
        url = normalize(args.gcs_url)
    else:
        server = EmbeddedPostgres()
        url = server.start()
    try:
        schema.upgrade(url)
        print(f"GCS: {redact(url)}; {args.tasks:,} tasks")
        size = asyncio.run(build_log(url, args.tasks))
        ok = report(size, asyncio.run(measure(url, args.repeat, args.tasks)))
    finally:
        if server is not None:
            server.stop()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
