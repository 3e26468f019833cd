"""What one call of the log's append and read functions costs on generic plans (how
the appends run, migration 0025) and on PL/pgSQL's default plan choice (how the reads
run, 0027), and what inserting into the log's table costs with its indexes and without.

    python bench/append_plans.py [--rounds N]

On an embedded PostgreSQL made for the run: the log gets 100,000 events (one in 50
addressed to node ``n1``), then each function is timed beside a copy of itself that
runs with ``plan_cache_mode = auto`` (PostgreSQL's default), the two called in turn
round after round on one connection with ``synchronous_commit = off`` (the fsync is
the disk's, not the plans'). Rows:

* append of 1 / 1000 events, with the log in 1 and in 4 shards (``cairn_append_v2``);
* a node's read of the events addressed to it among the last 3,000, and an
  unfiltered reader's read of the last 30 (``cairn_read_events_v1``);
* COPY of 1000 rows into ``events`` (its indexes), into copies of it with only its
  primary key (position: what any reader by position needs) and with that and the
  duplicate check's index (``event_id``: what an idempotent append needs), each beside
  a copy with no index: the floor of any append that keeps those indexes.

Figures: median microseconds per call (per event for the COPY rows); see bench/README.md,
"Generic plans".
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import asyncpg
from log_append import RAW_COLUMNS  # (this directory is on sys.path when run)

from controlplane import schema
from controlplane.eventlog import EntityKind, Event, EventAppender, new_event_id

APPEND_ARGS = "uuid[], text[], entity_kind[], text[], text[], text[], jsonb[], bytea[]"
APPEND_CALL = (
    "SELECT {f}($1::uuid[], $2::text[], $3::text[]::entity_kind[], $4::text[], $5::text[], "
    "$6::text[], $7::text[]::jsonb[], $8::bytea[])"
)
READ_CALL = "SELECT * FROM {f}($1, 1000, $2, $3, $4)"


async def _plans_copy(conn: asyncpg.Connection, function: str, args: str, mode: str) -> str:
    """A copy of ``function`` named ``<function>_<mode>`` that plans with
    ``plan_cache_mode = mode`` (everything else as it is)."""
    definition = await conn.fetchval(
        f"SELECT pg_get_functiondef('{function}({args})'::regprocedure)"
    )
    copy = f"{function}_{mode}"
    await conn.execute(definition.replace(f"FUNCTION public.{function}(", f"FUNCTION {copy}(", 1))
    await conn.execute(f"ALTER FUNCTION {copy}({args}) SET plan_cache_mode = {mode}")
    return copy


def _columns(batch: int, counter: list[int]) -> list[list[object]]:
    first = counter[0]
    counter[0] += batch
    return [
        [new_event_id() for _ in range(batch)],
        ["job-bench"] * batch,
        ["task"] * batch,
        [f"task-{first + i}" for i in range(batch)],
        ["submitted"] * batch,
        [None] * batch,
        [json.dumps({"name": "bench.f"})] * batch,
        [None] * batch,
    ]


async def _side_by_side(
    rounds: int, calls: dict[str, Callable[[], Awaitable[object]]]
) -> dict[str, float]:
    """Median seconds per call of each, called in turn (a few rounds of warm-up first)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(rounds + 5):
        for name, call in calls.items():
            began = time.perf_counter()
            await call()
            if round_ >= 5:
                times[name].append(time.perf_counter() - began)
    return {name: statistics.median(t) for name, t in times.items()}


async def _fill(url: str, events: int) -> None:
    async with EventAppender(url) as appender:
        for b in range(events // 1000):
            await appender.append_many(
                Event(
                    EntityKind.TASK,
                    f"fill-{b}-{i}",
                    "submitted",
                    {"name": "f", **({"to_node": "n1"} if i % 50 == 0 else {})},
                    job_id="job-fill",
                )
                for i in range(1000)
            )


async def _bench(url: str, rounds: int) -> list[tuple[str, float, float, str]]:
    rows: list[tuple[str, float, float, str]] = []
    await _fill(url, 100_000)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET synchronous_commit = off")
        await conn.execute("ANALYZE events")
        append_auto = await _plans_copy(conn, "cairn_append_v2", APPEND_ARGS, "auto")
        read_args = "bigint[], integer, bigint, text, text"
        read_auto = await _plans_copy(conn, "cairn_read_events_v1", read_args, "auto")
        read_generic = await _plans_copy(
            conn, "cairn_read_events_v1", read_args, "force_generic_plan"
        )
        counter = [0]
        for shards in (1, 4):
            if shards > 1:
                await asyncio.to_thread(schema.set_log_shards, url, shards)
            for batch, batch_rounds in ((1, rounds * 10), (1000, rounds)):

                def append(f: str, batch: int = batch) -> Callable[[], Awaitable[object]]:
                    return lambda: conn.fetchval(APPEND_CALL.format(f=f), *_columns(batch, counter))

                medians = await _side_by_side(
                    batch_rounds,
                    {"generic": append("cairn_append_v2"), "auto": append(append_auto)},
                )
                rows.append(
                    (
                        f"append of {batch} event(s), {shards} shard(s)",
                        medians["generic"] * 1e6,
                        medians["auto"] * 1e6,
                        "us/call",
                    )
                )
        head = await conn.fetchval("SELECT max(last_position) FROM event_log_shards")
        shards = await conn.fetchval("SELECT shard_count FROM event_log_head")
        for name, behind, reader, who in (
            ("a node's read of its events in the last 3000", 3000, "n1", "node"),
            ("an unfiltered read of the last 30 events", 30, None, "all"),
        ):

            def read(f: str, behind: int = behind, reader: str | None = reader, who: str = who):
                return lambda: conn.fetch(
                    READ_CALL.format(f=f), [head - behind] * shards, head, reader, who
                )

            medians = await _side_by_side(
                rounds * 10, {"generic": read(read_generic), "auto": read(read_auto)}
            )
            rows.append((name, medians["generic"] * 1e6, medians["auto"] * 1e6, "us/call"))
        # a bare copy of the table; one with its primary key (position) alone, the index
        # every reader by position needs; and one with the duplicate check's index too,
        # the least an idempotent append needs
        await conn.execute("CREATE TABLE bench_unindexed (LIKE events INCLUDING DEFAULTS)")
        await conn.execute("CREATE TABLE bench_keyed (LIKE events INCLUDING DEFAULTS)")
        await conn.execute("ALTER TABLE bench_keyed ADD PRIMARY KEY (position)")
        await conn.execute("CREATE TABLE bench_keyed_ids (LIKE bench_keyed INCLUDING ALL)")
        await conn.execute("CREATE INDEX ON bench_keyed_ids (event_id)")
        tables = ("events", "bench_keyed", "bench_keyed_ids", "bench_unindexed")
        # positions past the head (nothing appends any more), partitions made for them
        start = head + 1000
        until = start + 1000 * len(tables) * (rounds + 5)
        await conn.fetchval("SELECT cairn_ensure_partitions_v1($1)", until)
        positions = [start]

        def copy(table: str) -> Callable[[], Awaitable[object]]:
            async def run() -> None:
                first = positions[0]
                positions[0] += 1000
                now = dt.datetime.now(dt.UTC)
                await conn.copy_records_to_table(
                    table,
                    columns=RAW_COLUMNS,
                    records=[
                        (
                            first + i,
                            new_event_id(),
                            now,
                            "j",
                            "task",
                            f"c-{first + i}",
                            "submitted",
                            None,
                            '{"name":"f"}',
                            None,
                        )
                        for i in range(1000)
                    ],
                )

            return run

        medians = await _side_by_side(rounds, {table: copy(table) for table in tables})
        bare = medians["bench_unindexed"] * 1e3
        for table, what in (
            ("events", "events"),
            ("bench_keyed", "key only"),
            ("bench_keyed_ids", "key + event_id"),
        ):
            name = f"COPY 1000 rows: {what} | bare copy"
            rows.append((name, medians[table] * 1e3, bare, "us/event"))
    finally:
        await conn.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=30, help="calls of 1000 events each")
    args = parser.parse_args(argv)
    from controlplane.gcs import Gcs
    from controlplane.gcs_url import normalize

    with Gcs(None) as gcs:
        rows = asyncio.run(_bench(normalize(gcs.owner_url), args.rounds))
    print(f"{'call (COPY: the two tables)':<50} {'generic':>10} {'default':>10}  unit")
    for name, generic, auto, unit in rows:
        print(f"{name:<50} {generic:>10,.1f} {auto:>10,.1f}  {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
