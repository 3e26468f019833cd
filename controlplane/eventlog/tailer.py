"""The tailer: follows the log from where it stands in each shard, never skipping or
repeating an event, and returning events in position order (a causal order of the whole
log: controlplane/README.md, "The sharded log").

Each read is one call (cairn_read_events_v1, migrations/sql/0024): each shard's head H_s,
then, by a later statement, that shard's next events up to H_s (at most ``batch_size`` of
each). An append holds its shards' head rows until it commits, so a snapshot taken after
H_s was seen sees every event of shard s up to it (and the statement plans with every
partition they lie in: the migration says why it must come second): the tailer moves
shard s on to H_s, and an append still in flight takes a position past it.
When a shard gave a full batch (more may follow), the events returned stop at the lowest
last position of such shards, so that every event returned has its causes returned too
(they have lower positions and are committed, hence read). In a single-shard log positions
are also contiguous, and the tailer checks it (LogGapError, were one ever missing).

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
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

import asyncpg

from controlplane.errors import LogDivergedError, LogGapError
from controlplane.eventlog import fencing
from controlplane.eventlog.connection import (
    DEFAULT_CONNECT_TIMEOUT_S,
    connect,
    is_connection_error,
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


Positions = list[int]  # where a reader stands in each shard (index: the shard)


class Gathering:
    """A reader's pace under load (``Tailer``'s ``gather``): the next read no sooner
    than ``seconds`` after the last began."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._began = -math.inf  # (time.monotonic)

    def began(self) -> None:
        self._began = time.monotonic()

    async def wait(self, deadline: float | None) -> bool:
        """Waits out what is left of it (not past ``deadline``, a time.monotonic); whether
        there was any (the reader is asked again sooner than its pace: busy)."""
        until = self._began + self.seconds
        rest = (until if deadline is None else min(until, deadline)) - time.monotonic()
        if rest > 0:
            await asyncio.sleep(rest)
        return rest > 0


class Tailer:
    """Reads the events after ``after``, batch by batch, waiting for new ones.

    ``after``: where to start in each shard (``head_positions``: from now); an int is
    that position in every shard (0: from the start).
    ``reader``: None for every event; a node's id for the events addressed to that node
    (or to every node) and those about what it owns; ``SCHEDULER`` for the global
    scheduler's (see controlplane/README.md, "Reading only what concerns a reader").
    ``gather``: a read that reached the heads is followed by the next no sooner than
    this many seconds after it began, so that under a steady stream of appends each read
    takes what came meanwhile rather than one append's events (a read costs the server
    and the reader about as much for three events as for three hundred); when the log
    was quiet for that long the next read runs at once. 0: every wake-up reads."""

    def __init__(
        self,
        url: str,
        *,
        reader: str | None = None,
        after: int | Sequence[int] = 0,
        batch_size: int = 1000,
        poll_interval: float = 1.0,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        unavailable_timeout: float | None = None,
        gather: float = 0.0,
    ) -> None:
        self.url = url
        self.reader = reader
        self.positions: Positions = [] if isinstance(after, int) else list(after)
        self._start = after if isinstance(after, int) else 0  # (of a shard not listed)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.connect_timeout = connect_timeout
        self.unavailable_timeout = resolve_unavailable_timeout(unavailable_timeout)
        self.gather = Gathering(gather)
        self._conn: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._listening = False  # for its appends' notifications
        self._recent: deque[tuple[int, uuid.UUID]] = deque(maxlen=RECENT)
        self._epoch: int | None = None  # of the server the recent events were read on
        # the last read stopped short of a shard's horizon, at this position (more to read)
        self.cut: int | None = None

    @property
    def position(self) -> int:
        """The highest position read in any shard (for lag and metrics; where to resume
        is ``positions``)."""
        return max(self.positions, default=self._start)

    def reached(self, heads: Sequence[int]) -> bool:
        """Whether it has read every shard up to ``heads`` (``head_positions``)."""
        return all(self.at(shard) >= head for shard, head in enumerate(heads))

    @property
    def listening(self) -> bool:
        """Whether its appends' notifications wake it now (a gathering reader of a busy
        log does without them)."""
        return self._listening

    def at(self, shard: int) -> int:
        """Where it stands in ``shard``."""
        return self.positions[shard] if shard < len(self.positions) else self._start

    async def woken(self, timeout: float) -> None:
        """Returns once an append it follows may have committed since its last read
        began, or after ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def __aenter__(self) -> Tailer:
        await self.open()
        return self

    async def open(self, *, ride_out: bool = True) -> None:
        """Connects and listens. With ``ride_out``, a GCS that does not answer (a
        PostgreSQL restarting) is waited for, at most ``unavailable_timeout``, as its
        reads wait: a reader opened during an outage starts once it is over."""
        if not ride_out:
            await self._connect()
            return
        await retry_while_unavailable(self.url, self._connect, timeout=self.unavailable_timeout)

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
        """The next events, in position order.

        Waits up to ``wait`` seconds (None: forever) for at least one; returns [] if
        none came. ``positions`` advance past what is returned."""
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            # (the last read left nothing behind: gather what comes)
            paced = self.cut is None and await self.gather.wait(deadline)
            self._wake.clear()
            self.gather.began()
            rows = await retry_while_unavailable(
                self.url, self._query, timeout=self.unavailable_timeout
            )
            events = self._take(rows)
            if events:
                self._recent.extend((e.position, e.event_id) for e in events)
                fencing.saw(self.position, self._conn)  # a log found later below it was put back
                if paced and self._listening:  # (busy: its next read comes after the pace)
                    await self._listen_between_reads(False)
                return events
            if not self._listening:  # quiet again: to be woken from now on, once it has
                await self._listen_between_reads(True)  # looked again for what came before
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

    def _take(self, rows: list[asyncpg.Record]) -> list[RecordedEvent]:
        """What a read returns of the rows of one query (see the module's docstring),
        and where each shard stands after it."""
        horizons = {row["shard"]: row["horizon"] for row in rows if row["position"] is None}
        by_shard: dict[int, list[asyncpg.Record]] = {}
        for row in rows:
            if row["position"] is not None:
                by_shard.setdefault(row["shard"], []).append(row)
        full = [
            found[-1]["position"] for found in by_shard.values() if len(found) >= self.batch_size
        ]
        cut = self.cut = min(full) if full else None
        single = any(row["shard_count"] == 1 for row in rows if row["position"] is None)
        if single and self.reader is None:
            self._check_contiguous(by_shard.get(0, []))
        events = sorted(
            (
                RecordedEvent.from_row(row)
                for found in by_shard.values()
                for row in found
                if cut is None or row["position"] <= cut
            ),
            key=lambda event: event.position,
        )
        positions = [self.at(shard) for shard in range(max(horizons, default=-1) + 1)]
        for shard, horizon in horizons.items():
            reached = horizon if cut is None else min(horizon, cut)
            positions[shard] = max(positions[shard], reached)
        self.positions = positions
        return events

    def _check_contiguous(self, rows: list[asyncpg.Record]) -> None:
        """In a single-shard log every position up to the head is an event: a hole below
        the head is a damaged log, never to be skipped."""
        expected = self.at(0) + 1
        for row in rows:
            if row["position"] != expected:
                raise LogGapError(
                    f"position {expected} is missing below the log's head while "
                    f"{row['position']} is there: the log is damaged"
                )
            expected += 1

    async def _connect(self) -> None:
        self._conn = await connect(self.url, timeout=self.connect_timeout)
        epoch = fencing.epoch_of(self._conn)
        if self._epoch is not None and epoch is not None and epoch != self._epoch:
            await self._check_recent(self._conn)
        self._epoch = epoch if epoch is not None else self._epoch
        self._listening = False
        await self._listen(True)

    async def _listen(self, on: bool) -> None:
        """Listens for its appends' notifications, or stops."""
        channel, callback = (
            (CHANNEL, self._on_notify)
            if self.reader is None
            else (ADDRESSED_CHANNEL, self._on_addressed)
        )
        assert self._conn is not None
        if on:
            await self._conn.add_listener(channel, callback)
        else:
            await self._conn.remove_listener(channel, callback)
        self._listening = on

    async def unlisten(self) -> None:
        """Stops listening until one of its reads finds nothing (then it listens again,
        and looks once more): for a merged reader whose rounds are paced (busy), which
        reads each server's tailer on its own pace, not on its notifications. Not
        while a read of this tailer is in flight (its connection is busy)."""
        if self._listening and self._conn is not None and not self._conn.is_closed():
            await self._listen_between_reads(False)

    async def _listen_between_reads(self, on: bool) -> None:
        """``_listen`` from ``read``: a gathering reader of a busy log stops listening
        (each notification would wake its backend and its process for nothing: its next
        read runs after the pace anyway), and listens again once a read finds nothing.
        A connection that fails here is made anew by the next read, which listens."""
        try:
            await self._listen(on)
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            assert self._conn is not None
            self._conn.terminate()
            self._conn = None

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
        args: tuple[object, ...] = (self.positions, self.batch_size)
        if self.reader is None:
            query, args = "read_events_after", (*args, self._start)
        elif self.reader == SCHEDULER:
            query, args = "read_events_for_scheduler", (*args, self._start)
        else:
            query, args = "read_events_for_node", (*args, self.reader, self._start)
        return await run_on(self._conn, lambda c: c.fetch(queries[query], *args))


async def head_positions(conn: asyncpg.Connection) -> Positions:
    """Each shard's head now: a reader that starts there reads what is appended later."""
    return list(await conn.fetchval(queries["head_positions"]) or [])
