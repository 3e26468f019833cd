"""Many writer processes at once, one tailer: every event is delivered exactly once, in
an order consistent with each entity's order, while partitions roll over.

Half the writers append through raw transactions that sleep between taking their
positions and committing, so commits would land out of allocation order if the log let
them; the tailer must still see every position once, with no gap."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import threading
import uuid

import asyncpg
import pytest

from controlplane.eventlog import EntityKind, Event, EventAppender, Tailer
from controlplane.eventlog.partitions import PartitionManager

pytestmark = pytest.mark.timeout(240)

WRITERS = 8
ENTITIES_PER_WRITER = 50
EVENTS_PER_ENTITY = 40
TOTAL = WRITERS * ENTITIES_PER_WRITER * EVENTS_PER_ENTITY

_RAW_APPEND = (
    "SELECT * FROM cairn_append_v2($1::uuid[], $2::text[], $3::text[]::entity_kind[], "
    "$4::text[], $5::text[], $6::text[], $7::text[]::jsonb[], $8::bytea[])"
)


def _payload(writer: int, seq: int) -> dict[str, object]:
    return {"name": "stress", "writer": writer, "seq": seq}


async def _appender_writer(url: str, writer: int) -> None:
    async with EventAppender(url, max_batch=200) as appender:

        async def entity(e: int) -> None:
            for seq in range(EVENTS_PER_ENTITY):
                await appender.append(
                    Event(EntityKind.TASK, f"w{writer}-e{e}", "submitted", _payload(writer, seq))
                )

        await asyncio.gather(*(entity(e) for e in range(ENTITIES_PER_WRITER)))


async def _slow_committer(url: str, writer: int) -> None:
    """Appends in explicit transactions that sleep after allocating their positions."""
    conn = await asyncpg.connect(url)
    try:
        for seq in range(EVENTS_PER_ENTITY):
            n = ENTITIES_PER_WRITER
            async with conn.transaction():
                await conn.fetchrow(
                    _RAW_APPEND,
                    [uuid.uuid4() for _ in range(n)],
                    [None] * n,
                    ["task"] * n,
                    [f"w{writer}-e{e}" for e in range(n)],
                    ["submitted"] * n,
                    [None] * n,
                    [json.dumps(_payload(writer, seq))] * n,
                    [None] * n,
                )
                await conn.execute("SELECT pg_sleep(random() * 0.01)")
    finally:
        await conn.close()


def _writer_process(url: str, writer: int) -> None:
    if writer % 2:
        asyncio.run(_slow_committer(url, writer))
    else:
        asyncio.run(_appender_writer(url, writer))


def _roll_partitions(url: str, stop: threading.Event) -> None:
    manager = PartitionManager(url)
    while not stop.wait(0.05):
        manager.ensure_ahead()


async def test_concurrent_writers_and_one_tailer_exactly_once_in_entity_order(
    gcs_url: str,
) -> None:
    manager = PartitionManager(gcs_url)
    manager.configure(partition_size=1500, partitions_ahead=1)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(gcs_url, w)) for w in range(WRITERS)]
    stop = threading.Event()
    roller = threading.Thread(target=_roll_partitions, args=(gcs_url, stop), daemon=True)
    for proc in procs:
        proc.start()
    roller.start()
    positions: list[int] = []
    ids: set[uuid.UUID] = set()
    last_seq: dict[str, int] = {}
    try:
        async with Tailer(gcs_url, batch_size=500) as tailer:
            while len(positions) < TOTAL:
                batch = await tailer.read(wait=60)
                assert batch, "the tailer stalled before every event arrived"
                for event in batch:
                    positions.append(event.position)
                    ids.add(event.event_id)
                    seq = event.payload["seq"]
                    assert seq == last_seq.get(event.entity_id, -1) + 1, (
                        f"{event.entity_id}: seq {seq} after {last_seq.get(event.entity_id)}"
                    )
                    last_seq[event.entity_id] = seq
            assert await tailer.read(wait=0.5) == []
    finally:
        stop.set()
        roller.join()
        for proc in procs:
            proc.join(60)
    assert all(proc.exitcode == 0 for proc in procs)
    assert positions == list(range(1, TOTAL + 1))
    assert len(ids) == TOTAL
    assert all(seq == EVENTS_PER_ENTITY - 1 for seq in last_seq.values())
    assert len(last_seq) == WRITERS * ENTITIES_PER_WRITER
    parts = [p for p in manager.partitions() if p.state == "attached"]
    assert len(parts) >= TOTAL // 1500  # rolled over many times while writers ran
