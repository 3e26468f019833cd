"""A one-event append's cost as the log grows: appends/s against the number of partitions.

    python bench/append_partitions.py [--partitions 2,20,100,300] [--seconds 4] [--shards S]

An append checks that its events are not stored already (their ``event_id``). Until
migration 0030 the check read every attached partition's ``event_id`` index, so a
one-event append slowed as partitions piled up (a long-running cluster makes one per
million positions until ``cairn gc`` retires them). Now it reads the view of the recent
partitions (``recent_event_ids``) when no copy of its ids can lie before them
(controlplane/README.md, "The duplicate check as the log grows").

On one embedded PostgreSQL made for the run, the log is filled with batches of 1000
events into partitions of 1000 positions until it has each count of partitions below its
head; then one writer appends one event at a time for ``--seconds``, twice, alternately:
"recent", after the upkeep's round (``seal_full_partitions``, as a running cluster's head
runs every minute) has sealed the full partitions and, a round later, moved the view past
them; and "every", with the shards told that the view holds nothing (every partition read
through ``events``, the check before 0030). The benchmark sets ``max_clock_skew`` to 0.5 s
so that the second round may move the view 2.5 s after the first (the default, a minute,
only delays that). Printed: appends/s of each, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from controlplane import schema
from controlplane.eventlog import EntityKind, Event, EventAppender
from controlplane.eventlog.partitions import PartitionManager
from controlplane.gcs import Gcs
from controlplane.gcs_url import normalize

FILL_PARTITION = 1000  # positions per partition while filling
FILL_BATCH = 1000
MEASURED_PARTITION = 100_000  # positions of the partition the measured appends go to


def _event(n: int) -> Event:
    return Event(EntityKind.TASK, f"task-{n}", "submitted", {"name": "bench.f"}, job_id="job-bench")


async def _fill_to(url: str, conn: asyncpg.Connection, partitions: int, counter: list[int]) -> int:
    """Appends until the log has ``partitions`` partitions wholly below its head."""
    manager = PartitionManager(url)
    manager.configure(partition_size=FILL_PARTITION, partitions_ahead=1)
    async with EventAppender(url) as appender:
        while True:
            head = await conn.fetchval("SELECT max(last_position) FROM event_log_shards")
            below = await conn.fetchval(
                "SELECT count(*) FROM event_partitions WHERE upper_bound <= $1 + 1", head
            )
            if below >= partitions:
                break
            await appender.append_many(_event(counter[0] + i) for i in range(FILL_BATCH))
            counter[0] += FILL_BATCH
    # what the measured appends reach: one partition made ahead now, large enough for
    # all of them (no partition made while they run), small enough to fill up next
    manager.configure(partition_size=MEASURED_PARTITION, partitions_ahead=1)
    manager.ensure_ahead()
    # (autovacuum would visit every partition just filled while the appends are measured,
    # on the same cores: done now instead)
    await conn.execute("VACUUM (ANALYZE) events")
    return await conn.fetchval("SELECT count(*) FROM event_partitions")


async def _rate(url: str, seconds: float, counter: list[int]) -> float:
    async with EventAppender(url) as appender:
        for _ in range(200):  # (the connection's plans made)
            await appender.append(_event(counter[0]))
            counter[0] += 1
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            await appender.append(_event(counter[0]))
            counter[0] += 1
            n += 1
        return n / (time.perf_counter() - start)


async def _bench(url: str, counts: list[int], seconds: float) -> None:
    conn = await asyncpg.connect(url)
    counter = [0]
    try:
        await conn.execute("UPDATE event_log_head SET max_clock_skew = '0.5 seconds'")
        print(f"{'partitions':>10} {'recent':>10} {'every':>10} {'ratio':>7}   (appends/s)")
        for count in counts:
            total = await _fill_to(url, conn, count, counter)
            figures: dict[str, list[float]] = {"recent": [], "every": []}
            for _ in range(2):
                for label in ("recent", "every"):
                    if label == "recent":
                        PartitionManager(url).seal_full_partitions()
                        await asyncio.sleep(2.5)  # three skews after the seals, and more
                        PartitionManager(url).seal_full_partitions()
                        held = await conn.fetchval(
                            "SELECT cardinality(recent_partitions) FROM event_log_head"
                        )
                    else:
                        await conn.execute("UPDATE event_log_shards SET recent_until = 0")
                    figures[label].append(await _rate(url, seconds, counter))
            recent, every = max(figures["recent"]), max(figures["every"])
            print(
                f"{total:>10} {recent:>10,.0f} {every:>10,.0f} {recent / every:>7.2f}"
                f"   (the view: {held} partition(s))",
                flush=True,
            )
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--partitions", default="2,20,100,300", help="counts to measure at")
    parser.add_argument("--seconds", type=float, default=4.0, help="per rate measured")
    parser.add_argument("--shards", type=int, default=1, help="the log's shards")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.partitions.split(",")]
    print(
        f"machine: {os.cpu_count()} CPUs; one writer, one event per append; {args.shards} "
        f"shard(s); {time.strftime('%Y-%m-%d %H:%M')}",
        flush=True,
    )
    with Gcs(None) as gcs:
        url = normalize(gcs.owner_url)
        if args.shards > 1:
            schema.set_log_shards(url, args.shards)
        asyncio.run(_bench(url, counts, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
