"""The batching appender: many callers, one connection, group commit.

Callers ``await append(...)``; while one batch is being committed the next fills up, so
under load every commit carries many events (group commit) without any added delay.
One batch is in flight at a time and batches are taken in arrival order, so events
from one appender are stored in the order they were appended (per entity and overall).

A batch that fails because the connection was lost is sent again, with the same event
ids, until it succeeds or the GCS stays unreachable for ``unavailable_timeout``
seconds: the append function skips ids already stored, so an event whose first commit
succeeded but whose acknowledgement was lost is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import asyncpg

from controlplane.errors import (
    GcsError,
    GcsIdentityError,
    GcsUnavailableError,
    InvalidEventError,
    NodeFencedError,
)
from controlplane.eventlog import fencing
from controlplane.eventlog.catalog import encode_payload
from controlplane.eventlog.clock import AppendBound, LogClock
from controlplane.eventlog.connection import (
    DEFAULT_CONNECT_TIMEOUT_S,
    connect,
    is_connection_error,
    resolve_unavailable_timeout,
    retry_while_unavailable,
    run_on,
)
from controlplane.eventlog.events import JOB_KINDS, Event, readers_of
from controlplane.gcs_url import redact
from controlplane.sql import queries

DEFAULT_MAX_BATCH = 1000
# events queued and not yet committed above which writers are asked to wait (see
# ``below_backlog``): written-behind events must not pile up faster than they commit
DEFAULT_MAX_BACKLOG = 4000
log = logging.getLogger("cairn.eventlog")

# A writer node's append past its bound (migrations/sql/0032_append_bounds.up.sql); how
# often a writer that waits for the bound's renewal looks (its pings renew it every
# ``membership.PING_INTERVAL_S``).
PAST_BOUND_SQLSTATE = "CN001"
BOUND_RENEWAL_POLL_S = 0.05


class PastBoundError(GcsError):
    """A writer node's append to a server other than server 0 would have passed its
    bound: nothing stored; ``reached``, the highest position it would have taken."""

    def __init__(self, message: str, reached: int) -> None:
        super().__init__(message)
        self.reached = reached


@dataclass(slots=True)
class _Request:
    events: list[Event]
    payloads: list[str]
    done: asyncio.Future[list[int]] | None  # None: nobody waits (see write_behind)


class EventAppender:
    """Appends events to the log from one process (or one component of it)."""

    def __init__(
        self,
        url: str,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        unavailable_timeout: float | None = None,
        linger: float = 0.0,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        writer_node: str | None = None,
        clock: LogClock | None = None,
        bound: AppendBound | None = None,
    ) -> None:
        """``writer_node``: the node this process appends for, once it is a cluster
        member: the log refuses its appends once it was declared dead (NodeFencedError;
        ``on_fenced`` hears of it, and every append after fails at once). A GCS that is
        not this process's log (GcsIdentityError, see ``fencing.py``) is refused the
        same way: ``on_refused`` hears of it, and every append after fails at once.
        ``clock``: on one server of a log on several, the process's clock, which its
        appends take positions past and move on (``servers.py``). ``bound``: on a
        server other than server 0, the writer node's bound (``clock.AppendBound``): an
        append that would pass it waits for its renewal and is tried again."""
        self.url = url
        self.clock = clock
        self.bound = bound
        self.writer_node = writer_node
        self.fenced: NodeFencedError | None = None
        self.on_fenced: Callable[[NodeFencedError], None] = lambda _error: None
        self.refused: GcsIdentityError | None = None
        self.on_refused: Callable[[GcsIdentityError], None] = lambda _error: None
        self.max_batch = max_batch
        self.max_backlog = max_backlog
        self.backlog = 0  # events queued or being committed
        self._below = asyncio.Event()  # set while backlog <= max_backlog // 2
        self._below.set()
        self.linger = linger
        self.connect_timeout = connect_timeout
        self.unavailable_timeout = resolve_unavailable_timeout(unavailable_timeout)
        self._conn: asyncpg.Connection | None = None
        self._queue: deque[_Request] = deque()
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._gave_up = False  # the GCS stayed unreachable for the whole timeout
        self.unreachable = False  # the last try to write failed to reach the GCS
        self._closed = False
        self.batches_committed = 0
        self.events_committed = 0  # since start (metrics: events appended per second)
        self.on_write_behind_failure: Callable[[GcsError], None] = _log_failure

    async def start(self, *, connect_now: bool = True) -> EventAppender:
        """Connects (unless not ``connect_now``: the first append does), and commits from
        now on."""
        if connect_now:
            self._conn = await connect(self.url, timeout=self.connect_timeout)
            try:
                await _refuse_a_clock_ahead(self._conn, self.url)
            except GcsError:
                await self._conn.close()
                self._conn = None
                raise
        self._flusher = asyncio.create_task(self._flush_loop(), name="cairn-event-appender")
        return self

    async def close(self, timeout: float | None = None) -> None:
        """Commits what is queued (for at most ``timeout`` seconds, None: however long
        riding out an outage takes; what is left then fails, and is said to be lost),
        then closes the connection."""
        if self._closed:
            return
        self._closed = True
        self._urgent.set()
        self._wake.set()
        if self._flusher is not None:
            done, _ = await asyncio.wait([self._flusher], timeout=timeout)
            if not done:
                self._abandon()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)

    def _abandon(self) -> None:
        """Stops riding out (closing): what is queued fails and is said to be lost."""
        assert self._flusher is not None
        lost = GcsUnavailableError(
            f"closed while the GCS at {redact(self.url)} did not answer: "
            f"{self.backlog} queued events were not recorded"
        )
        self._flusher.cancel()
        left, self._queue = list(self._queue), deque()
        log.error("%s", lost)
        for request in left:
            if request.done is not None and not request.done.done():
                request.done.set_exception(lost)
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def __aenter__(self) -> EventAppender:
        return await self.start()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def append(self, event: Event) -> int:
        """Appends one event; returns its position once it is durable."""
        return (await self.append_many([event]))[0]

    async def append_many(self, events: Iterable[Event]) -> list[int]:
        """Appends events together, in order, in one transaction; returns their
        positions once they are durable. Nothing is written if any event is invalid."""
        batch = list(events)
        if not batch:
            return []
        return await self.enqueue(batch)

    def enqueue(
        self,
        events: Sequence[Event],
        *,
        urgent: bool = True,
        payloads: Sequence[str] | None = None,
    ) -> asyncio.Future[list[int]]:
        """Queues events at once (keeping call order without awaiting); the future
        gives their positions once they are durable. Raises InvalidEventError, with
        nothing queued, if any event is invalid.

        Events that are not ``urgent`` may wait up to ``linger`` seconds for more to
        join their commit; an urgent request flushes everything queued before it.
        ``payloads``: the events' payloads as ``encode_payload`` gave them, from a
        caller that checked them already (a log on several servers checks a whole
        batch before it splits it)."""
        done = asyncio.get_running_loop().create_future()
        self._queue_request(events, done, urgent, payloads)
        return done

    def write_behind(self, events: Sequence[Event], payloads: Sequence[str] | None = None) -> None:
        """Queues events that nobody waits for (as ``enqueue(urgent=False)``, without
        a future): they are committed in order with the rest, and a failure to commit
        them is reported to ``on_write_behind_failure``."""
        self._queue_request(events, None, False, payloads)

    def _queue_request(
        self,
        events: Sequence[Event],
        done: asyncio.Future[list[int]] | None,
        urgent: bool,
        encoded: Sequence[str] | None = None,
    ) -> None:
        if self._closed or self._flusher is None:
            raise GcsError("the event appender is not running (start() it, or it was closed)")
        batch = list(events)
        payloads = list(encoded) if encoded is not None else [encode_payload(e) for e in batch]
        if len(batch) > 1 and len({event.event_id.int for event in batch}) != len(batch):
            raise InvalidEventError("an event_id is repeated within one append_many call")
        self._queue.append(_Request(batch, payloads, done))
        self.backlog += len(batch)
        if self.backlog > self.max_backlog:
            self._below.clear()
        if urgent or not self.linger:
            self._urgent.set()
        self._wake.set()

    # -- the flusher ------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.linger and not self._urgent.is_set():
                # only lingering events so far: give others a moment to join them
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self.linger)
            self._urgent.clear()
            while self._queue:
                await self._flush(self._take_batch())
            if self._closed:
                return

    def _take_batch(self) -> list[_Request]:
        taken = [self._queue.popleft()]
        size = len(taken[0].events)
        if not self._queue or size + len(self._queue[0].events) > self.max_batch:
            return taken  # (the common case under load: a batch of one request)
        seen = {event.event_id.int for event in taken[0].events}
        while self._queue and size + len(self._queue[0].events) <= self.max_batch:
            ids = {event.event_id.int for event in self._queue[0].events}
            if not seen.isdisjoint(ids):  # a retry of a queued event: next batch
                break
            seen |= ids
            request = self._queue.popleft()
            taken.append(request)
            size += len(request.events)
        return taken

    async def below_backlog(self) -> None:
        """Returns once the backlog is at most half of ``max_backlog`` (at once if it
        has not passed ``max_backlog``): a writer whose events are written behind waits
        here, so that they never pile up faster than they commit."""
        await self._below.wait()

    async def _flush(self, requests: list[_Request]) -> None:
        try:
            await self._commit(requests)
        finally:
            self.backlog -= sum(len(request.events) for request in requests)
            if self.backlog <= self.max_backlog // 2:
                self._below.set()

    async def _commit(self, requests: list[_Request]) -> None:
        events = [event for request in requests for event in request.events]
        payloads = [payload for request in requests for payload in request.payloads]
        # once it has waited out one outage, one try each until the GCS answers again:
        # callers fail fast while it stays down, not one full timeout per batch
        timeout = 0.0 if self._gave_up else self.unavailable_timeout
        try:
            if self.fenced is not None:
                raise self.fenced
            if self.refused is not None:
                raise self.refused
            positions = (
                await retry_while_unavailable(
                    self.url, lambda: self._write(events, payloads), timeout=timeout
                )
                if events
                else []  # (a request of no events: done once those before it are)
            )
        except BaseException as exc:
            error = exc if isinstance(exc, GcsError) else GcsError(f"append failed: {exc!r}")
            if isinstance(exc, GcsUnavailableError):
                self._gave_up = True
            if isinstance(exc, NodeFencedError) and self.fenced is None:
                self.fenced = exc
                self.on_fenced(exc)
            if isinstance(exc, GcsIdentityError) and self.refused is None:
                self.refused = exc
                self.on_refused(exc)
            for request in requests:
                if request.done is None:
                    self.on_write_behind_failure(error)
                elif not request.done.done():
                    request.done.set_exception(error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._gave_up = False
        self.batches_committed += 1
        self.events_committed += len(events)
        if positions:
            fencing.saw(max(positions), self._conn)
            if self.clock is not None:
                self.clock.saw(max(positions))
        offset = 0
        for request in requests:
            count = len(request.events)
            if request.done is not None and not request.done.done():
                request.done.set_result(positions[offset : offset + count])
            offset += count

    async def _write(self, events: Sequence[Event], payloads: Sequence[str]) -> list[int]:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await connect(self.url, timeout=self.connect_timeout)
            positions = await self._write_below_bound(self._conn, events, payloads)
        except BaseException as exc:
            if is_connection_error(exc) or isinstance(exc, GcsUnavailableError):
                self.unreachable = True
            raise
        self.unreachable = False
        return positions

    async def _write_below_bound(
        self, conn: asyncpg.Connection, events: Sequence[Event], payloads: Sequence[str]
    ) -> list[int]:
        """One append, tried again each time the writer's bound is renewed while it
        would pass it (its clock moved past what it reached, so the next ping renews the
        bound past that): a node cut off from server 0 appends nothing more here."""
        writer = self.writer_node
        while True:
            floor = None if self.clock is None else self.clock.position
            below = None if self.bound is None else self.bound.position
            try:
                append = functools.partial(
                    append_on,
                    events=events,
                    payloads=payloads,
                    writer=writer,
                    floor=floor,
                    below=below,
                )
                return await run_on(conn, append)
            except PastBoundError as past:
                if self.clock is not None:
                    self.clock.saw(past.reached)
                assert self.bound is not None and below is not None
                log.info("node %s: %s; waiting for its pings to renew it", writer, past)
                while (self.bound.position or 0) <= below:
                    await asyncio.sleep(BOUND_RENEWAL_POLL_S)


async def append_on(
    conn: asyncpg.Connection,
    events: Sequence[Event],
    payloads: Sequence[str] | None = None,
    *,
    writer: str | None = None,
    floor: int | None = None,
    below: int | None = None,
) -> list[int]:
    """Appends events on ``conn`` (inside the caller's transaction, if any, so that an
    event can commit together with other writes); returns their positions. On behalf
    of node ``writer``, fenced: NodeFencedError if the node was declared dead. An event
    of a job's entity that names no job is given its entity's job first (``jobs_of``;
    an entity's events in one shard). With a
    ``floor`` (on one server of a log on several), positions past it; with ``below``
    (a writer's bound there), PastBoundError if one would not be below it, nothing
    stored. The readers are
    woken at its commit, or after it in a sharded log (queries.sql, ``append_events``); a
    caller not in a transaction does it all in one call (``append_events_committed``)."""
    if payloads is None:
        payloads = [encode_payload(event) for event in events]
    readers = readers_of(events)
    job_ids = [e.job_id for e in events]
    kinds = [str(e.entity_kind) for e in events]
    entity_ids = [e.entity_id for e in events]
    if any(e.job_id is None and e.entity_kind in JOB_KINDS for e in events):
        job_ids = await conn.fetchval(queries["jobs_of"], job_ids, kinds, entity_ids)
    columns = (
        [e.event_id for e in events],
        job_ids,
        kinds,
        entity_ids,
        [e.event_type for e in events],
        [e.node_id for e in events],
        payloads,
        [bytes(e.data) if e.data is not None else None for e in events],
    )
    try:
        if conn.is_in_transaction():
            row = await _append_in_transaction(conn, columns, readers, writer, floor, below)
        else:  # one call: the append commits, then its readers are woken (queries.sql)
            query = queries["append_events_committed"]
            row = await conn.fetchrow(query, writer, floor, below, *columns, readers)
    except asyncpg.PostgresError as exc:
        if getattr(exc, "sqlstate", None) == PAST_BOUND_SQLSTATE:
            raise PastBoundError(str(exc), int(getattr(exc, "detail", None) or 0)) from None
        raise
    positions = list(row["positions"])
    if writer is not None and row["refused"]:
        recorded = "" if floor is not None else " (a stale_refused event records them)"
        raise NodeFencedError(
            f"the log refused {len(events)} events of node {writer}: it was declared dead"
            f"{recorded}; it must rejoin under a new id"
        )
    return positions


async def _append_in_transaction(
    conn: asyncpg.Connection,
    columns: tuple[Sequence[Any], ...],
    readers: str,
    writer: str | None,
    floor: int | None,
    below: int | None,
) -> asyncpg.Record:
    """``append_on`` in the caller's transaction, whose commit wakes the readers (a
    procedure that commits cannot join it: queries.sql, ``append_events``)."""
    if writer is not None and floor is not None:
        query = queries["append_events_fenced_after"]
        row = await conn.fetchrow(query, writer, floor, below, *columns)
    elif writer is not None:
        row = await conn.fetchrow(queries["append_events_fenced"], writer, *columns, readers)
    elif floor is not None:
        row = await conn.fetchrow(queries["append_events_after"], *columns, floor)
    else:
        row = await conn.fetchrow(queries["append_events"], *columns, readers)
    if row["positions"] and not row["notified"]:  # (a sharded log's, at the commit)
        await conn.execute(queries["notify_appended"], str(max(row["positions"])), readers)
    return row


class FailureLog:
    """Logs failures to record events at most once per ``every`` seconds, with how
    many were left out: an outage of the GCS fails every batch, and one line a batch
    would bury the cause."""

    def __init__(self, logger: logging.Logger, what: str, every: float = 10.0) -> None:
        self.logger, self.what, self.every = logger, what, every
        self._last = -math.inf
        self._left_out = 0

    def __call__(self, error: BaseException) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            self._left_out += 1
            return
        more = f" ({self._left_out} more such failures not logged)" if self._left_out else ""
        self.logger.error("%s could not be recorded: %s%s", self.what, error, more)
        self._last, self._left_out = now, 0


_log_failure = FailureLog(log, "events written behind")


async def _refuse_a_clock_ahead(conn: asyncpg.Connection, url: str) -> None:
    """Fails at the start, naming both clocks, if this machine's clock runs further ahead
    of the GCS's than an event id may be made (``max_clock_skew``): every id it made would
    be refused (migration 0030). ``sent`` is a lower bound of this clock when the server
    read its own, so latency never makes it look ahead."""
    sent = time.time()
    row = await conn.fetchrow(queries["server_clock"])
    if row is None:
        return
    ahead, skew = sent - row["now"].timestamp(), row["max_clock_skew"].total_seconds()
    if ahead > skew:
        raise GcsError(
            f"this machine's clock is {ahead:.1f} s ahead of the GCS's at {redact(url)}, "
            f"more than the {skew:g} s an event id may be made ahead (max_clock_skew): "
            "every event it recorded would be refused; set its clock right (NTP)"
        )
