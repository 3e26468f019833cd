"""One log on several PostgreSQL servers (migrations/sql/0021_log_servers.up.sql;
controlplane/README.md, "A log on several servers"): shard s of S lies on server
``s % N``. ``ServersAppender`` sends each event to its shard's server, with the process's
clock; ``ServersTailer`` reads every server and returns an event only once its causes
on the other servers are known to have been read.

**Why the merged reader returns no effect before its cause.** On one server, one
statement sees every shard's head at once, and a cause commits before its effect is
appended, so a read that sees the effect sees the cause (tailer.py). Servers share no
snapshot: the reader reads them one after the other. Take an effect Y read from server B
at time t, caused by X on server A. X committed before Y was appended, so before t, and
X has the lower position (the clock: whoever appended Y had seen X). A read of A that
begins after t sees X as committed, and returns it unless it stopped short of X's
position (a full batch: ``Tailer.cut``). So Y is returned once every other server has
been read since t up to at least Y's position, and no event read and held back has a
lower position (X may be one); until then it is held, and the reader's positions stay
below it, so a reader that resumes from them reads it again. Reading in
rounds (each server once per round), an event of the first server is returned in its own
round, one of another server in the next: one query per server more, no waiting for an
idle server to move (no closed timestamps).

**A server that does not answer.** The argument needs a read of every other server after
Y was read. A server that stays unreachable (lost without a replica, or not yet promoted)
would hold back every other server's events, and with them the work of every job, not
only of those whose shards it holds. So once a server has not answered for
``away_after`` seconds (longer than a failover or a restart takes), the reader counts it
**away**: the others' events are returned without a read of it, in position order among
themselves, and its own are returned once it answers again, the reads of it going on
from where they stood (nothing skipped, nothing twice). What that gives up, for the
outage alone: an event of the away server that committed after the reader's last read
of it is returned after the effects of it on other servers (which lie in other jobs'
shards: an entity's events are all on one server, so no entity's history is reordered).
Appenders do the same (``ServersAppender``): what a writer wrote behind to an away
server does not hold back its urgent batches to the others, and a batch whose job only
an away server can name (``_jobs_found``) holds back only the later batches of the same
entities; it waits, as what is queued for that server does, until the server answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from controlplane.errors import GcsError, GcsIdentityError, GcsUnavailableError, NodeFencedError
from controlplane.eventlog.appender import EventAppender
from controlplane.eventlog.catalog import encode_payload
from controlplane.eventlog.clock import PROCESS_CLOCK, AppendBound, LogClock, node_bound
from controlplane.eventlog.connection import (
    DEFAULT_CONNECT_TIMEOUT_S,
    connect,
    is_connection_error,
    resolve_unavailable_timeout,
    retry_while_unavailable,
    run_on,
)
from controlplane.eventlog.events import JOB_KINDS, EntityKind, Event, RecordedEvent
from controlplane.eventlog.tailer import Gathering, Tailer, head_positions
from controlplane.gcs_url import normalize, with_login
from controlplane.settings import env_number
from controlplane.sql import queries

log = logging.getLogger("cairn.gcs")
JOBS_KEPT = 65_536  # entities whose job an appender looked up, kept (the oldest go)
# How long the merged reader waits for a server that does not answer before it reads the
# others on without it (longer than a failover or a restart of the server takes).
AWAY_AFTER_ENV = "CAIRN_GCS_SERVER_AWAY_AFTER_S"
DEFAULT_AWAY_AFTER_S = 10.0


def shard_of(job_id: str | None, shards: int) -> int:
    """A job's shard: cairn_shard_of_v1 (migrations/sql/0019), computed here."""
    if job_id is None or shards <= 1:
        return 0
    return int(hashlib.md5(job_id.encode()).hexdigest()[:8], 16) % shards


async def log_layout(url: str) -> tuple[int, int, int]:
    """(shard count, this server's index, server count) of the log at ``url``."""
    conn = await connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT shard_count, server_index, server_count FROM event_log_head WHERE id = 1"
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["shard_count"]), int(row["server_index"]), int(row["server_count"])


async def check_layout(urls: Sequence[str]) -> int:
    """The log's shard count, once each URL is checked to be its server of that index
    (GcsError otherwise: a server list in another order would misplace events). A server
    other than server 0 that does not answer is not checked (it is away: the process
    starts, and its connections check the server's identity once it answers)."""
    counts = set()
    for index, url in enumerate(urls):
        try:
            shards, server, servers = await log_layout(url)
        except GcsUnavailableError as exc:
            if index == 0:
                raise
            log.warning("the GCS's server %d does not answer (starting without it): %s", index, exc)
            continue
        if (server, servers) != (index, len(urls)):
            raise GcsError(
                f"{_safe(url)} is server {server} of {servers} of its log, not server "
                f"{index} of {len(urls)}: name the servers in the order the log was made with"
            )
        counts.add(shards)
    if len(counts) != 1:
        raise GcsError(f"the servers disagree on the log's shard count ({sorted(counts)})")
    return counts.pop()


def server_url(home_url: str, address: str) -> str:
    """A server's URL for a process that reaches server 0 at ``home_url``: the address,
    with server 0's login, and its connection options (TLS files) under the address's."""
    home, there = urlsplit(normalize(home_url)), urlsplit(address)
    hostport = there.netloc
    if hostport.startswith(":"):  # on server 0's machine: its hosts, the address's ports
        entries = home.netloc.rpartition("@")[2].split(",")
        machines = dict.fromkeys(entry.rsplit(":", 1)[0] for entry in entries)
        ports = hostport.split(",")  # (several: a primary and its replica)
        hostport = ",".join(f"{host}{port}" for host in machines for port in ports)
    query = {**dict(parse_qsl(home.query)), **dict(parse_qsl(there.query))}
    url = urlunsplit(there._replace(netloc=hostport, query=urlencode(query)))
    if home.username is None:
        return url
    return with_login(url, unquote(home.username), unquote(home.password or ""))


async def log_urls(home_url: str) -> list[str]:
    """Every server of the log whose server 0 ``home_url`` names, in order (just
    ``home_url`` for a log on one server)."""
    conn: asyncpg.Connection = await connect(home_url)
    try:
        rows = await conn.fetch(queries["log_server_addresses"])
    finally:
        await conn.close()
    return [home_url, *(server_url(home_url, row["address"]) for row in rows[1:])]


def _safe(url: str) -> str:
    return url.split("@")[-1]


class ServersAppender:
    """Appends to a log on several servers: one ``EventAppender`` per server, all on the
    process's ``clock``. A batch commits on each server it touches as one transaction
    there; the servers' parts commit independently and concurrently (appends to
    different servers never wait for one another), so a caller that needs an event
    after another across servers appends it once the first is answered.

    A server's appender rides out its outage for as long as it lasts: what was queued
    for it waits, in order, and nothing is dropped (on one server, the events written
    behind are given up after ``unavailable_timeout``, when the process stops anyway;
    here the others go on, and a hole in a job's history would outlive the outage).
    So the callers of the jobs whose shards it holds wait, the others do not
    (``away_after``). A job lookup rides it out too (``_after_lookup``). ``close``
    waits for both at most ``unavailable_timeout``. ``bound``: a writer node's, which
    its appends to the servers other than server 0 stay below (``clock.AppendBound``)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        clock: LogClock | None = None,
        away_after: float | None = None,
        bound: AppendBound | None = None,
        **options: object,
    ):
        self.urls = list(urls)
        self.clock = clock if clock is not None else LogClock()
        self.away_after = away_after_s(away_after)
        self.unavailable_timeout = resolve_unavailable_timeout(
            cast("float | None", options.pop("unavailable_timeout", None))
        )
        self.shards = 0
        self._appenders = [
            EventAppender(
                url,
                clock=self.clock,
                bound=bound if index > 0 else None,  # (server 0 fences with the liveness row)
                unavailable_timeout=math.inf,
                **options,  # type: ignore[arg-type]
            )
            for index, url in enumerate(self.urls)
        ]
        self._unrouted: list[_Unrouted] = []  # batches waiting for jobs, or behind one, in order
        self._closing = False
        self._lookups: list[asyncpg.Connection | None] = [None] * len(self.urls)  # for the jobs
        self._jobs: OrderedDict[tuple[EntityKind, str], str] = OrderedDict()  # found so far

    async def start(self) -> ServersAppender:
        self.shards = await check_layout(self.urls)
        for index, appender in enumerate(self._appenders):
            try:
                await appender.start()
            except GcsUnavailableError:
                if index == 0:
                    raise
                await appender.start(connect_now=False)  # (away: it connects to append)
        return self

    async def close(self) -> None:
        """Commits what is queued, waiting at most ``unavailable_timeout`` for a server
        that does not answer (what is left for it is said to be lost)."""
        self._closing = True
        waiting = [u.task for u in self._unrouted if u.task is not None]
        if waiting:
            _done, left = await asyncio.wait(waiting, timeout=self.unavailable_timeout)
            for task in left:  # (their jobs' server did not answer: said to be lost)
                task.cancel()
            await asyncio.wait(waiting)
        await asyncio.gather(*(a.close(self.unavailable_timeout) for a in self._appenders))
        for lookup in self._lookups:
            if lookup is not None:
                lookup.terminate()

    async def __aenter__(self) -> ServersAppender:
        return await self.start()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def server_of(self, event: Event) -> int:
        return self.server_of_job(event.job_id)

    def server_of_job(self, job_id: str | None) -> int:
        return shard_of(job_id, self.shards) % len(self.urls)

    # -- what a node daemon's recorder uses of an EventAppender -------------------------

    @property
    def backlog(self) -> int:
        return sum(appender.backlog for appender in self._appenders)

    @property
    def max_backlog(self) -> int:
        return sum(appender.max_backlog for appender in self._appenders)

    @property
    def events_committed(self) -> int:
        return sum(appender.events_committed for appender in self._appenders)

    @property
    def batches_committed(self) -> int:
        return sum(appender.batches_committed for appender in self._appenders)

    def _set_on_refused(self, callback: Callable[[GcsIdentityError], None]) -> None:
        for appender in self._appenders:
            appender.on_refused = callback

    def _set_on_fenced(self, callback: Callable[[NodeFencedError], None]) -> None:
        for appender in self._appenders:
            appender.on_fenced = callback

    on_refused = property(lambda self: self._appenders[0].on_refused, _set_on_refused)
    on_fenced = property(lambda self: self._appenders[0].on_fenced, _set_on_fenced)

    async def below_backlog(self) -> None:
        for appender in self._appenders:
            await appender.below_backlog()

    def enqueue(self, events: Sequence[Event], *, urgent: bool = True) -> asyncio.Future[list[int]]:
        """As ``EventAppender.enqueue``: the future is done once these events and every
        event queued before them, on any server, are durable (a server with none of
        these but some queued gets an empty request, done after them; one that has not
        answered for ``away_after`` seconds, and does not answer, is not waited for:
        what was queued there lands once it is back). A batch with an
        event whose job must be looked up (``_jobs_found``) waits for it, and so does
        every batch queued after it, in order (``_after_lookup``)."""
        batch, payloads = self._checked(events)
        if not self._unrouted and not self._unknown(batch):
            return self._route(batch, payloads, urgent)
        return self._after_lookup(batch, payloads, urgent, behind=False)

    def write_behind(self, events: Sequence[Event]) -> None:
        batch, payloads = self._checked(events)
        if not self._unrouted and not self._unknown(batch):
            self._route_behind(batch, payloads)
        else:
            self._after_lookup(batch, payloads, False, behind=True)

    def _checked(self, events: Sequence[Event]) -> tuple[list[Event], list[str]]:
        """The batch, each event checked (invalid: refused here, before any server
        queues a part of it), and its payloads as encoded then, for the servers'
        appenders (in the batch's order, which the job lookup keeps)."""
        batch = _with_jobs(list(events))
        payloads = [encode_payload(event) for event in batch]
        for event in batch:
            if event.job_id is not None and event.entity_kind is EntityKind.OBJECT:
                self._known(event.entity_kind, event.entity_id, event.job_id)
        return batch, payloads

    def _known(self, kind: EntityKind, entity_id: str, job_id: str) -> None:
        """An object's job, for the events of it that will name none (it is freed,
        moved or lost here), so that they need no lookup."""
        self._jobs[(kind, entity_id)] = job_id
        if len(self._jobs) > JOBS_KEPT:
            self._jobs.popitem(last=False)

    def _route_behind(self, batch: list[Event], payloads: list[str]) -> None:
        for server, indexes in self._parts(batch).items():
            self._appenders[server].write_behind(
                [batch[i] for i in indexes], [payloads[i] for i in indexes]
            )

    def _route(
        self, batch: list[Event], payloads: list[str], urgent: bool
    ) -> asyncio.Future[list[int]]:
        """Queues each server's part at once (an empty request on a server with a
        backlog); the future gives the positions in the batch's order."""
        parts = self._parts(batch)
        waits = {}
        for server, appender in enumerate(self._appenders):
            if server in parts or appender.backlog:
                part = parts.get(server, [])
                waits[server] = appender.enqueue(
                    [batch[i] for i in part], urgent=urgent, payloads=[payloads[i] for i in part]
                )

        behind = {wait: server for server, wait in waits.items() if server not in parts}
        for wait in behind:
            wait.add_done_callback(_retrieved)

        async def positions() -> list[int]:
            waiting = behind
            while waiting:  # (a server slow to commit its backlog is waited for)
                _done, pending = await asyncio.wait(waiting, timeout=self.away_after)
                waiting = {wait: waiting[wait] for wait in pending}
                if all(self._appenders[server].unreachable for server in waiting.values()):
                    break
            own = [server for server in waits if server in parts]
            answers = await asyncio.gather(*(waits[s] for s in own), return_exceptions=True)
            for answer in answers:
                if isinstance(answer, BaseException):
                    raise answer
            found = dict(zip(own, cast("list[list[int]]", answers), strict=True))
            out = [0] * len(batch)
            for server, indexes in parts.items():
                for i, position in zip(indexes, found[server], strict=True):
                    out[i] = position
            return out

        return asyncio.ensure_future(positions())

    # -- events whose job is known on another server only ------------------------------

    def _unknown(self, batch: list[Event]) -> bool:
        """Whether an event of a job's entity names no job, even from what was found
        before (a node frees, moves or loses an object it fetched: the job is in the
        object's events, maybe on another server)."""
        unknown = False
        for i, event in enumerate(batch):
            if event.job_id is None and event.entity_kind in JOB_KINDS:
                job = self._jobs.get((event.entity_kind, event.entity_id))
                if job is None:
                    unknown = True
                else:
                    batch[i] = dataclasses.replace(event, job_id=job)
        return unknown

    def _after_lookup(
        self, batch: list[Event], payloads: list[str], urgent: bool, *, behind: bool
    ) -> asyncio.Future[list[int]]:
        """Routes ``batch`` once the jobs it lacks are found, after the batches queued
        before it that waited for the same (so the servers take a writer's events in
        order); the future gives its positions (none for events written behind).

        A lookup that only a server that does not answer can settle rides out its outage,
        as what is queued for that server does (the event goes there: dropping it would
        leave a hole in its job's history). After ``away_after`` it is **held**, and the
        batches after it go on without it unless they name one of its entities (or of a
        batch held behind it): those wait, held too, so that no entity's events are
        stored out of order. A held batch lands once its server answers, after batches
        of other entities queued later (as a reader returns an away server's events)."""
        ahead = list(self._unrouted)
        me = _Unrouted(frozenset((e.entity_kind, e.entity_id) for e in batch))
        self._unrouted.append(me)

        async def later() -> list[int]:
            found: list[Event] | None = None
            try:
                try:
                    await _after(ahead, me)
                    found = await self._jobs_found(batch, me)
                except asyncio.CancelledError:
                    if not self._closing:
                        raise
                    failure: GcsError = GcsUnavailableError(
                        f"closed while no server could name the job of {len(batch)} "
                        "event(s) (the server of their job did not answer): not recorded"
                    )
                except Exception as exc:
                    failure = (
                        exc if isinstance(exc, GcsError) else GcsError(f"append failed: {exc!r}")
                    )
                if found is None:
                    if not behind:
                        raise failure
                    self._appenders[0].on_write_behind_failure(failure)
                    return []
                if behind:
                    self._route_behind(found, payloads)
                    return []
                routed = self._route(found, payloads, urgent)
            finally:
                self._routed(me)  # (once queued on its servers: before anything after it)
            return await routed

        me.task = asyncio.ensure_future(later())
        return me.task

    def _routed(self, me: _Unrouted) -> None:
        if me in self._unrouted:
            self._unrouted.remove(me)
        me.routed.set()

    async def _jobs_found(self, batch: list[Event], me: _Unrouted) -> list[Event]:
        """``batch`` with the job each event lacking one has in the whole log: every
        server is asked for the jobs of its own entities' events (``jobs_of``), and the
        first answers that name them all do (an entity's events lie on one server, so
        a server that does not answer is waited for only while one is still unknown,
        riding out its outage: ``me`` is held once that took ``away_after``); still none:
        it stays without (shard 0)."""
        if not self._unknown(batch):
            return batch
        args = (
            [e.job_id for e in batch],
            [str(e.entity_kind) for e in batch],
            [e.entity_id for e in batch],
        )
        jobs = list(args[0])
        asks = [
            asyncio.ensure_future(self._jobs_on(server, args)) for server in range(len(self.urls))
        ]
        failure: BaseException | None = None
        holding = asyncio.get_running_loop().call_later(self.away_after, me.hold)
        try:
            for answer in asyncio.as_completed(asks):
                try:
                    said = await answer
                except GcsUnavailableError as exc:
                    failure = exc
                    continue
                jobs = [
                    job if job is not None else other for job, other in zip(jobs, said, strict=True)
                ]
                if not self._unknown_in(batch, jobs):
                    failure = None
                    break
        finally:
            for ask in asks:
                ask.cancel()
            holding.cancel()
        if failure is not None and self._unknown_in(batch, jobs):
            raise failure
        found = []
        for event, job in zip(batch, jobs, strict=True):
            if event.job_id is None and job is not None:
                self._known(event.entity_kind, event.entity_id, job)
                event = dataclasses.replace(event, job_id=job)
            found.append(event)
        return found

    @staticmethod
    def _unknown_in(batch: list[Event], jobs: list[str | None]) -> bool:
        return any(
            job is None and event.entity_kind in JOB_KINDS
            for event, job in zip(batch, jobs, strict=True)
        )

    async def _jobs_on(
        self, server: int, args: tuple[list[str | None], list[str], list[str]]
    ) -> list[str | None]:
        """What ``server`` says of the batch's jobs, riding out its outage as its appender
        does (``close`` bounds it)."""

        async def ask() -> list[str | None]:
            lookup = self._lookups[server]
            if lookup is None or lookup.is_closed():
                lookup = self._lookups[server] = await connect(self.urls[server])
            try:
                return list(await run_on(lookup, lambda c: c.fetchval(queries["jobs_of"], *args)))
            except asyncio.CancelledError:  # (answered elsewhere: not left mid-request)
                lookup.terminate()
                raise

        return await retry_while_unavailable(self.urls[server], ask, timeout=math.inf)

    def _parts(self, batch: list[Event]) -> dict[int, list[int]]:
        parts: dict[int, list[int]] = {}
        for i, event in enumerate(batch):
            parts.setdefault(self.server_of(event), []).append(i)
        return parts

    async def append(self, event: Event) -> int:
        return (await self.append_many([event]))[0]

    async def append_many(self, events: Iterable[Event]) -> list[int]:
        """Positions in the order of ``events``, once every part is durable."""
        batch, payloads = self._checked(list(events))  # (an invalid event: nothing queued anywhere)
        if not self._unrouted and not self._unknown(batch):
            return await self._route(batch, payloads, True)
        return await self._after_lookup(batch, payloads, True, behind=False)


@dataclass(eq=False)
class _Unrouted:
    """A batch of a ``ServersAppender`` waiting for its jobs, or behind one that is."""

    keys: frozenset[tuple[EntityKind, str]]  # its entities
    task: asyncio.Future[list[int]] | None = None
    routed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # set once it waits for a server that has not answered for away_after
    held: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def hold(self) -> None:
        self.held.set()


async def _after(ahead: list[_Unrouted], me: _Unrouted) -> None:
    """Returns once each batch ``ahead`` is routed, or held with none of ``me``'s
    entities (``ServersAppender._after_lookup``); ``me`` is held while it waits for a
    held batch of its entities."""
    while True:
        blocking = [
            u
            for u in ahead
            if not u.routed.is_set() and not (u.held.is_set() and u.keys.isdisjoint(me.keys))
        ]
        if not blocking:
            return
        if any(u.held.is_set() for u in blocking):
            me.hold()
        # until one of them is routed, or held
        changes = [u.routed.wait() for u in blocking]
        changes += [u.held.wait() for u in blocking if not u.held.is_set()]
        waits = [asyncio.ensure_future(change) for change in changes]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()


def away_after_s(given: float | None = None) -> float:
    """How long a server may not answer before the others go on without it: given, else
    ``$CAIRN_GCS_SERVER_AWAY_AFTER_S``."""
    if given is not None:
        return given
    return env_number(AWAY_AFTER_ENV, DEFAULT_AWAY_AFTER_S, minimum=0.001)


def _retrieved(future: asyncio.Future[list[int]]) -> None:
    """An empty request's outcome, not waited for (its failure is its own batches')."""
    if not future.cancelled():
        future.exception()


def _with_jobs(events: list[Event]) -> list[Event]:
    """An event of a job's entity that names no job gets the job another event of the
    batch names for that entity (as cairn_jobs_of_v1 does on a server: it could not
    look across servers, so the event must reach the right one)."""
    known = {
        (e.entity_kind, e.entity_id): e.job_id
        for e in events
        if e.job_id is not None and e.entity_kind in JOB_KINDS
    }
    if not known:
        return events
    out = []
    for e in events:
        job = known.get((e.entity_kind, e.entity_id)) if e.job_id is None else None
        if job is not None:
            e = dataclasses.replace(e, job_id=job)
        out.append(e)
    return out


@dataclass(slots=True)
class _Held:
    event: RecordedEvent
    server: int
    seq: int  # when the read that found it ended (a tick of the reader's)


@dataclass(slots=True)
class _Read:
    """A server's read in flight: a task, since a server that does not answer is ridden
    out inside it while the others are read on."""

    task: asyncio.Future[list[RecordedEvent]]
    began: int  # a tick of the reader's
    since: float  # monotonic time it began


class ServersTailer:
    """Follows a log on several servers: a ``Tailer`` per server (``reader``, ``after``
    and the options as for one), merged as the module's docstring says. ``positions``
    is where it stands in each shard (what a reader saves to resume from).

    A server that has not answered for ``away_after`` seconds (None:
    ``$CAIRN_GCS_SERVER_AWAY_AFTER_S``, 10 s) is **away**: the others' events are returned
    without waiting for it, and its own once it answers again (the module's docstring
    says what that costs). It raises GcsUnavailableError only once no server answers."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        after: int | Sequence[int] = 0,
        clock: LogClock | None = None,
        away_after: float | None = None,
        gather: float = 0.0,
        **options: object,
    ) -> None:
        self.urls = list(urls)
        self.gather = Gathering(gather)  # (the rounds': each server's read does not wait)
        self._again = False  # the last round left events to read or to release
        self.clock = clock if clock is not None else LogClock()
        self.away_after = away_after_s(away_after)
        self.shards = 0
        self._tailers = [
            Tailer(url, after=after, **options)  # type: ignore[arg-type]
            for url in self.urls
        ]
        self._poll = self._tailers[0].poll_interval
        self._held: list[_Held] = []
        self._tick = 0
        # per server, its reads since the oldest held event's: (tick it began, cut)
        self._reads: list[list[tuple[int, int | None]]] = [[] for _ in self.urls]
        self._in_flight: dict[int, _Read] = {}
        self.away: set[int] = set()  # servers whose events are not waited for
        self._found: set[int] = set()  # servers where this round's reads found events
        self._failed: set[int] = set()  # away, riding out given up since

    async def __aenter__(self) -> ServersTailer:
        home = self._tailers[0]  # (server 0 must answer: waited for, as a read waits)
        self.shards = await retry_while_unavailable(
            home.url, lambda: check_layout(self.urls), timeout=home.unavailable_timeout
        )
        await home.open()
        for tailer in self._tailers[1:]:
            # one try: a server that does not answer is away, its reads connect later
            with contextlib.suppress(GcsUnavailableError):
                await tailer.open(ride_out=False)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for read in self._in_flight.values():
            read.task.cancel()
        self._in_flight.clear()
        for tailer in self._tailers:
            await tailer.close()

    @property
    def positions(self) -> list[int]:
        """Each shard's position on its server, below the first event held back there."""
        n = len(self.urls)
        positions = [self._tailers[s % n].at(s) for s in range(self.shards)]
        for held in self._held:
            shard = held.event.position % self.shards
            positions[shard] = min(positions[shard], held.event.position - 1)
        return positions

    @positions.setter
    def positions(self, positions: Sequence[int]) -> None:
        """Reads on from ``positions`` (what another reader of the same name saved)."""
        for read in self._in_flight.values():
            read.task.cancel()
        self._in_flight.clear()
        for tailer in self._tailers:
            tailer.positions = list(positions)
        self._held = []
        self._reads = [[] for _ in self.urls]
        self._again = False

    @property
    def position(self) -> int:
        return max(self.positions, default=0)

    @property
    def listening(self) -> list[bool]:
        """Per server, whether its appends' notifications wake this reader now."""
        return [tailer.listening for tailer in self._tailers]

    def reached(self, heads: Sequence[int]) -> bool:
        """Whether it has returned every shard's events up to ``heads``."""
        positions = self.positions
        return all(positions[shard] >= head for shard, head in enumerate(heads))

    async def read(self, wait: float | None = None) -> list[RecordedEvent]:
        """The next events whose causes are all returned (now or before), in position
        order; waits up to ``wait`` seconds (None: forever) for one."""
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            paced = not self._again and await self.gather.wait(deadline)
            self.gather.began()
            more, self._found = False, set()
            for server in range(len(self._tailers)):
                more = await self._read_server(server) or more
            released = self._release()
            self._again = bool(self._held) or more
            if released:
                self.clock.saw(released[-1].position)
                if paced:  # busy: the next round comes after the pace, woken or not
                    await self._unlisten()
                return released
            if self._again:
                continue  # (the next round returns them)
            timeout = self._poll
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    return []
            waits = [asyncio.ensure_future(t.woken(timeout)) for t in self._tailers]
            riding_out = [read.task for read in self._in_flight.values()]
            await asyncio.wait(
                [*waits, *cast("list[asyncio.Future[None]]", riding_out)],
                return_when=asyncio.FIRST_COMPLETED,
            )
            for waiting in waits:
                waiting.cancel()

    async def _unlisten(self) -> None:
        """The tailers of the servers where this round found events stop listening (as
        a single server's gathering tailer does while busy); each listens again once a
        read of it finds nothing. (A read in flight is not one of this round's.)"""
        for server in self._found:
            if server not in self._in_flight:
                await self._tailers[server].unlisten()

    def _tock(self) -> int:
        self._tick += 1
        return self._tick

    async def _read_server(self, server: int) -> bool:
        """Reads ``server`` once, or finds its read in flight done (one that is away:
        not waited for); whether a batch was cut short (more to read there)."""
        read = self._in_flight.get(server)
        if read is None:
            read = self._in_flight[server] = _Read(
                asyncio.ensure_future(self._tailers[server].read(wait=0)),
                self._tock(),
                time.monotonic(),
            )
        if server not in self.away:
            left = read.since + self.away_after - time.monotonic()
            await asyncio.wait([read.task], timeout=max(left, 0))
            if not read.task.done():
                self._went_away(server, read)
                return False
        if not read.task.done():
            return False
        del self._in_flight[server]
        try:
            found = read.task.result()
        except GcsUnavailableError:  # (given up riding out: a new read rides on)
            self._went_away(server, read)
            self._failed.add(server)
            if len(self._failed) == len(self._tailers):
                raise
            return False
        if server in self.away:
            self.away.discard(server)
            self._failed.discard(server)
            log.warning("the GCS's server %d answers again: its events are read on", server)
        cut = self._tailers[server].cut
        self._reads[server].append((read.began, cut))
        ended = self._tock()
        self._held.extend(_Held(event, server, ended) for event in found)
        if found:
            self._found.add(server)
        return cut is not None

    def _went_away(self, server: int, read: _Read) -> None:
        if server not in self.away:
            self.away.add(server)
            log.warning(
                "the GCS's server %d has not answered for %.1fs: the events of the other "
                "servers are read on without waiting for it (its own once it answers)",
                server,
                time.monotonic() - read.since,
            )

    def _release(self) -> list[RecordedEvent]:
        ready: list[_Held] = []
        kept: list[_Held] = []
        for held in self._held:
            (ready if self._causes_read(held) else kept).append(held)
        # a cause read but held back holds back its effects (a higher position)
        below = min((held.event.position for held in kept), default=None)
        if below is not None:
            kept += [held for held in ready if held.event.position > below]
            ready = [held for held in ready if held.event.position < below]
        self._held = kept
        oldest = min((held.seq for held in kept), default=self._tick)
        self._reads = [[r for r in reads if r[0] >= oldest] or reads[-1:] for reads in self._reads]
        return sorted((held.event for held in ready), key=lambda event: event.position)

    def _causes_read(self, held: _Held) -> bool:
        position = held.event.position
        return all(
            any(began > held.seq and (cut is None or cut >= position) for began, cut in reads)
            for server, reads in enumerate(self._reads)
            if server != held.server and server not in self.away
        )


async def fence_node(
    urls: Sequence[str],
    node_id: str,
    clock: LogClock,
    *,
    away_ok: bool = False,
    timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> list[int]:
    """Fences ``node_id`` on every server (migrations/sql/0022_fences_on_servers.up.sql):
    once this returns, the log refuses its appends everywhere, and every event it got in
    is below ``clock`` (so below the ``dead`` event appended next with it).

    ``away_ok``: a server that does not answer is left out, and returned (the indexes
    in ``urls``) rather than raised: the caller bounds what the node got in there some
    other way (membership.py: its bound); ``timeout``: for each to answer a connect."""
    away: list[int] = []
    for index, url in enumerate(urls):
        try:
            conn: asyncpg.Connection = await connect(url, timeout=timeout)
        except GcsUnavailableError:
            if not away_ok:
                raise
            away.append(index)
            continue
        try:
            head = await run_on(conn, lambda c: c.fetchval(queries["fence_node"], node_id))
            clock.saw(int(head or 0))
        except BaseException as exc:
            if not (away_ok and is_connection_error(exc)):
                raise
            away.append(index)
        finally:
            if not conn.is_closed():
                await conn.close()
    return away


async def servers_head_positions(urls: Sequence[str], *, away_ok: bool = False) -> list[int]:
    """Each shard's head on its server: where a reader that starts now starts.

    ``away_ok``: a server other than server 0 that does not answer gives its shards the
    highest head of the others. A reader starting there misses nothing that comes
    after it: what is appended there once it is back, by a writer that saw anything
    the reader did (its node's registration), lies past that (the clock: servers.py)."""
    heads: dict[int, int] = {}
    away = False
    for index, url in enumerate(urls):
        try:
            conn: asyncpg.Connection = await connect(url)
        except GcsUnavailableError:
            if index == 0 or not away_ok:
                raise
            away = True
            continue
        try:
            for row in await conn.fetch(queries["shard_heads"]):
                heads[row["shard"]] = row["last_position"]
                shards = int(row["shard_count"])
        finally:
            await conn.close()
    if away:
        highest = max(heads.values(), default=0)
        heads = {shard: heads.get(shard, highest) for shard in range(shards)}
    return [heads[shard] for shard in sorted(heads)]


LogAppender = EventAppender | ServersAppender
LogTailer = Tailer | ServersTailer


async def open_appender(url: str, **options: object) -> LogAppender:
    """The appender of the log whose server 0 is at ``url`` (not started): one server's,
    or the several servers' on the process's clock."""
    urls = await _log_urls_once_it_answers(url, options)
    if len(urls) == 1:
        return EventAppender(url, **options)  # type: ignore[arg-type]
    writer = options.get("writer_node")
    bound = node_bound(writer) if isinstance(writer, str) else None
    return ServersAppender(urls, clock=PROCESS_CLOCK, bound=bound, **options)  # type: ignore[arg-type]


async def open_tailer(url: str, **options: object) -> LogTailer:
    """The tailer of the log whose server 0 is at ``url`` (to enter): one server's, or
    the several servers' merged on the process's clock."""
    urls = await _log_urls_once_it_answers(url, options)
    if len(urls) == 1:
        return Tailer(url, **options)  # type: ignore[arg-type]
    return ServersTailer(urls, clock=PROCESS_CLOCK, **options)  # type: ignore[arg-type]


async def log_head_positions(url: str, *, away_ok: bool = False) -> list[int]:
    """Each shard's head, on whichever server it lies: where a reader that starts now
    starts (``away_ok``: as ``servers_head_positions``)."""
    urls = await log_urls(url)
    if len(urls) > 1:
        return await servers_head_positions(urls, away_ok=away_ok)
    conn: asyncpg.Connection = await connect(url)
    try:
        return await head_positions(conn)
    finally:
        await conn.close()


async def _log_urls_once_it_answers(url: str, options: dict[str, object]) -> list[str]:
    """``log_urls``, waiting for server 0 while it does not answer (at most the reader's
    or writer's ``unavailable_timeout``): a daemon's reader or writer made while its
    PostgreSQL restarts starts once it is back, rather than stop the daemon."""
    given = options.get("unavailable_timeout")
    timeout = resolve_unavailable_timeout(given if isinstance(given, int | float) else None)
    return await retry_while_unavailable(url, lambda: log_urls(url), timeout=timeout)
