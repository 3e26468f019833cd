"""The projector: a follower of the log that keeps the projection tables (jobs, tasks,
objects, actors, nodes) equal to the fold of the log.

Each batch is applied in one transaction together with the projector's position in
``subscriptions`` (exactly-once, as eventsourcing's tracking records). The position row
is locked first, so two projectors running at once never apply an event twice: the
second one finds the position moved and skips what was applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from datetime import datetime
from types import TracebackType
from typing import Any

import asyncpg

from controlplane.eventlog.connection import connect
from controlplane.eventlog.events import RecordedEvent
from controlplane.eventlog.servers import LogTailer, log_head_positions, open_tailer
from controlplane.projections.spec import TABLES, Row, Table, fold
from controlplane.sql import queries

SUBSCRIPTION = "projections"
# Its tailer's pace under load (Tailer's ``gather``): each batch applied is a transaction
# of its own, so a projector woken by every append would apply one append's events at a
# time and compete with the writers for the server; projections lag at most this more.
GATHER_S = 0.01
SCHEMA = "projection"  # the plain names (jobs, tasks, ...) are the views of migration 0009


def qualified(table: Table) -> str:
    """The projection table's name in its schema."""
    return f"{SCHEMA}.{table.name}"


def _select_sql(table: Table) -> str:
    return f"SELECT * FROM {qualified(table)} WHERE {table.key} = ANY($1::text[])"


def _upsert_sql(table: Table) -> str:
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in table.columns if c != table.key)
    return (
        f"INSERT INTO {qualified(table)} SELECT * FROM jsonb_populate_recordset("
        f"NULL::{qualified(table)}, "
        f"$1::jsonb) ON CONFLICT ({table.key}) DO UPDATE SET {updates}"
    )


def _json_default(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__} in a projection row")


def decode_row(table: Table, record: asyncpg.Record) -> Row:
    """A projection row as the fold produces it (JSON columns decoded)."""
    row = dict(record)
    for column in table.json_columns:
        if isinstance(row.get(column), str):
            row[column] = json.loads(row[column])
    return row


class Projector:
    def __init__(self, url: str, *, batch_size: int = 1000, name: str = SUBSCRIPTION) -> None:
        self.url = url
        self.batch_size = batch_size
        self.name = name
        self._conn: asyncpg.Connection | None = None
        self._tailer: LogTailer | None = None

    @property
    def position(self) -> int:
        return self._tailer.position if self._tailer else 0

    async def __aenter__(self) -> Projector:
        self._conn = await connect(self.url)
        await self._conn.execute(queries["ensure_subscription"], self.name)
        saved = await self._conn.fetchval(queries["subscription_position"], self.name)
        self._tailer = await open_tailer(
            self.url, after=list(saved or []), batch_size=self.batch_size, gather=GATHER_S
        )
        await self._tailer.__aenter__()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._tailer is not None:
            await self._tailer.close()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)

    async def step(self, wait: float | None = None) -> int:
        """Applies the next batch of events (waiting up to ``wait`` s for one)."""
        assert self._tailer is not None
        read_from = self._tailer.positions
        events = await self._tailer.read(wait)
        if events:
            await self._apply(events, read_from)
        return len(events)

    async def catch_up(self) -> int:
        """Applies everything appended before this call; returns the position reached."""
        assert self._conn is not None
        assert self._tailer is not None
        heads = await log_head_positions(self.url)
        while not self._tailer.reached(heads):
            await self.step(wait=1.0)
        return self.position

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.step(wait=0.2)

    async def _apply(self, events: list[RecordedEvent], read_from: list[int]) -> None:
        """Applies a batch read from ``read_from`` (the positions saved, unless another
        projector of the same name moved them meanwhile: then nothing is applied, and
        reading goes on from where that one stands)."""
        assert self._conn is not None and self._tailer is not None
        async with self._conn.transaction():
            saved = list(await self._conn.fetchval(queries["lock_subscription"], self.name))
            if _trimmed(saved) != _trimmed(read_from):  # another projector moved it: read
                # on from where that one stands
                self._tailer.positions = saved
                return
            keys: dict[Table, set[str]] = defaultdict(set)
            for event in events:
                if event.entity_kind in TABLES:
                    keys[TABLES[event.entity_kind]].add(event.entity_id)
            before: dict[tuple[str, str], Row] = {}
            for table, ids in keys.items():
                for record in await self._conn.fetch(_select_sql(table), list(ids)):
                    before[(table.name, record[table.key])] = decode_row(table, record)
            after = fold(events, before)
            for table in keys:
                rows = [row for (name, _), row in after.items() if name == table.name]
                if rows:
                    await self._conn.execute(
                        _upsert_sql(table), json.dumps(rows, default=_json_default)
                    )
            await self._conn.execute(
                queries["save_subscription_position"], self.name, self._tailer.positions
            )


def _trimmed(positions: list[int]) -> list[int]:
    """Positions per shard without the shards not read yet (0) at the end: where a
    reader stands, whether or not its list names them."""
    while positions and positions[-1] == 0:
        positions = positions[:-1]
    return positions
