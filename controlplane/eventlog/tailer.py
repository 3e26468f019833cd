"""The tailer: follows the log from a saved position, in position order, never skipping
or repeating an event.

Positions are commit-ordered (cairn_append_v1 holds the head row's lock until commit),
so once position p is visible every position below it is too. The tailer does not rely
on that alone: it only ever advances to ``position + 1``; if it sees a hole it waits
for the hole to fill (``gap_patience`` seconds) and raises :class:`LogGapError` rather
than skip past it.

It is woken by ``NOTIFY cairn_events_v1`` (sent by every append at commit) and catches
up by query; a periodic poll covers notifications lost while reconnecting.

**After a failover.** A primary that dies while commits wait for its synchronous
replica can show them to readers although they never reached the replica (PostgreSQL:
"the transaction has already committed locally, but might not have been replicated"),
and their writers, never answered, append them again on the promoted server, maybe at
other positions. So the tailer keeps the ids of the last ``RECENT`` events it returned,
and when it reconnects to a server of another epoch it checks that the log there holds
them at the same positions; if not, LogDivergedError: what its process built on them may
not stand, and it stops rather than go on from a history the log does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType

import asyncpg

from controlplane.errors import LogDivergedError, LogGapError
from controlplane.eventlog import fencing
from controlplane.eventlog.connection import (
    DEFAULT_CONNECT_TIMEOUT_S,
    connect,
    resolve_unavailable_timeout,
    retry_while_unavailable,
    run_on,
)
from controlplane.eventlog.events import EVERY_NODE, SCHEDULER, RecordedEvent
from controlplane.sql import queries

CHANNEL = "cairn_events_v1"  # every append's: the new head position
# ... and the readers it concerns (events.readers_of): a filtered reader wakes only for
# a batch that names it, or every node (or, for the scheduler, the scheduler)
ADDRESSED_CHANNEL = "cairn_events_for_v1"
RECENT = 10_000  # events whose ids are kept, to check after a failover


class Tailer:
    """Reads events with position > ``after``, batch by batch, waiting for new ones.

    ``reader``: None for every event; a node's id for the events addressed to that node
    (or to every node) and those about what it owns; ``SCHEDULER`` for the global
    scheduler's (see controlplane/README.md, "Reading only what concerns a reader").
    Such a reader's events are not contiguous in position: it reads up to the head's
    position as its query saw it, every position below which is committed, and moves
    on to it."""

    def __init__(
        self,
        url: str,
        *,
        reader: str | None = None,
        after: int = 0,
        batch_size: int = 1000,
        poll_interval: float = 1.0,
        gap_patience: float = 10.0,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        unavailable_timeout: float | None = None,
    ) -> None:
        self.url = url
        self.reader = reader
        self.position = after
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.gap_patience = gap_patience
        self.connect_timeout = connect_timeout
        self.unavailable_timeout = resolve_unavailable_timeout(unavailable_timeout)
        self._conn: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._recent: deque[tuple[int, uuid.UUID]] = deque(maxlen=RECENT)
        self._epoch: int | None = None  # of the server the recent events were read on

    async def __aenter__(self) -> Tailer:
        await self._connect()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)
            self._conn = None

    async def read(self, wait: float | None = None) -> list[RecordedEvent]:
        """The next events after ``position`` (at most ``batch_size``), in order.

        Waits up to ``wait`` seconds (None: forever) for at least one; returns [] if
        none came. ``position`` advances past what is returned."""
        deadline = None if wait is None else time.monotonic() + wait
        gap_since: float | None = None
        while True:
            self._wake.clear()
            rows = await retry_while_unavailable(
                self.url, self._query, timeout=self.unavailable_timeout
            )
            if self.reader is not None:
                events = self._addressed(rows)
                rows = []  # (no hole to wait for: it read up to the horizon)
            else:
                events = self._contiguous(rows)
                if events:
                    self.position = events[-1].position
            if events:
                self._recent.extend((e.position, e.event_id) for e in events)
                fencing.saw(self.position, self._conn)  # a log found later below it was put back
                return events
            if rows:  # a hole right after our position: wait for it to fill
                gap_since = gap_since or time.monotonic()
                if time.monotonic() - gap_since > self.gap_patience:
                    raise LogGapError(
                        f"position {self.position + 1} is missing while {rows[0]['position']} "
                        f"is visible, for more than {self.gap_patience:.0f}s"
                    )
                await asyncio.sleep(0.001)
                continue
            timeout = self.poll_interval
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    return []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def __aiter__(self) -> AsyncIterator[RecordedEvent]:
        while True:
            for event in await self.read():
                yield event

    # -- internals ----------------------------------------------------------------

    def _addressed(self, rows: list[asyncpg.Record]) -> list[RecordedEvent]:
        """A filtered read's events; ``position`` moves past them, or to the horizon
        (the head's position in the query's snapshot) when the batch was not full:
        appends hold the head row's lock until they commit, so the snapshot that sees
        the head at H sees every event up to H, and none addressed to this reader
        below H is left behind."""
        horizon = next((row["horizon"] for row in rows if row["position"] is None), None)
        events = sorted(
            (RecordedEvent.from_row(row) for row in rows if row["position"] is not None),
            key=lambda event: event.position,
        )
        if len(events) == self.batch_size:
            self.position = events[-1].position
        elif horizon is not None and horizon > self.position:
            self.position = horizon
        return events

    def _contiguous(self, rows: list[asyncpg.Record]) -> list[RecordedEvent]:
        events = []
        expected = self.position + 1
        for row in rows:
            if row["position"] != expected:
                break
            events.append(RecordedEvent.from_row(row))
            expected += 1
        return events

    async def _connect(self) -> None:
        self._conn = await connect(self.url, timeout=self.connect_timeout)
        epoch = fencing.epoch_of(self._conn)
        if self._epoch is not None and epoch is not None and epoch != self._epoch:
            await self._check_recent(self._conn)
        self._epoch = epoch if epoch is not None else self._epoch
        if self.reader is None:
            await self._conn.add_listener(CHANNEL, self._on_notify)
        else:
            await self._conn.add_listener(ADDRESSED_CHANNEL, self._on_addressed)

    async def _check_recent(self, conn: asyncpg.Connection) -> None:
        """The events this tailer returned last are where it read them (see the
        module's docstring), or LogDivergedError."""
        read = dict(self._recent)
        rows = await conn.fetch(queries["event_ids_at"], list(read))
        held = {row["position"]: row["event_id"] for row in rows}
        lost = sorted(pos for pos, event_id in read.items() if held.get(pos) != event_id)
        if lost:
            raise LogDivergedError(
                f"after a failover the log no longer holds {len(lost)} event(s) this process "
                f"read on the old primary (positions {lost[0]} to {lost[-1]}): commits that "
                "never reached the replica. What was built on them may not stand: this "
                "process stops, and one started anew reads the log as it is"
            )

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._wake.set()

    def _on_addressed(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        readers = payload.split(",")
        if self.reader in readers or (self.reader != SCHEDULER and EVERY_NODE in readers):
            self._wake.set()

    async def _query(self) -> list[asyncpg.Record]:
        if self._conn is None or self._conn.is_closed():
            await self._connect()
            self._wake.set()  # notifications may have been missed while away
        assert self._conn is not None
        args: tuple[object, ...]
        if self.reader is None:
            query, args = "read_events_after", (self.position, self.batch_size)
        elif self.reader == SCHEDULER:
            query, args = "read_events_for_scheduler", (self.position, self.batch_size)
        else:
            query, args = "read_events_for_node", (self.position, self.reader, self.batch_size)
        return await run_on(self._conn, lambda c: c.fetch(queries[query], *args))
