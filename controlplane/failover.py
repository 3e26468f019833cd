"""Failover without an operator: the watchdog of a head's GCS replica.

``cairn start --head --gcs-replicas 1`` runs the embedded PostgreSQL (the primary) and a
synchronous streaming replica of it, and hands every process a URL naming both, with
``target_session_attrs=read-write``: whichever takes writes is the one used. The
watchdog, a thread of the head's process (``Gcs``), watches both, every 50 ms:

* **The primary's process exited** (SIGKILL, a crash, the OOM killer): the replica is
  promoted at once.
* **The primary does not answer** (``SELECT 1`` on a connection of the watchdog's own)
  for ``$CAIRN_GCS_FAILOVER_AFTER_S`` (1 s): it is SIGKILLed first, with its backends,
  and then the replica promoted. The primary runs on this machine and this process
  started it, so it can be made sure dead: fencing by killing, never two primaries.
* **Promotion**: ``pg_promote``; the promoted server waits for no standby of its own;
  ``cairn_epoch_v1()`` records the new epoch (its timeline) in the log's database, so
  that every process that reaches it from then on refuses the old primary should it
  ever come back (``eventlog/fencing.py``). Clients were retrying meanwhile (appenders
  hold their batches, with the same event ids); they find the new primary by the URL.
* **The replica's process exited, or it does not answer** for the same bound: it is
  killed (so it can never be promoted without what it missed), and the primary stops
  waiting for it (``synchronous_standby_names`` reset, which releases the commits
  waiting on it): the cluster goes on without a replica, and without failover.

One failover per head: after it the cluster runs on the promoted server alone (a new
replica is not made; restart the head for one). This replica runs on the head's
machine: it survives the loss of the primary's process, not of the machine. A replica on
another machine (``gcs_replica.py``) is watched from both ends instead:
``RemoteStandbyWatch`` on the primary's machine, ``PrimaryWatch`` on the replica's.

**A primary that is only cut off, or frozen, but still running.** On this machine the
watchdog kills it before promoting, so that case does not arise. Were the primary on
another machine, cut off from the watchdog but not from some clients, it could not be
killed; what keeps it from taking writes then is synchronous replication: a commit is
acknowledged only once the replica has it, and the promoted replica follows it no more,
so every commit on the old primary waits for ever, never acknowledged (it would become
visible there only if the old primary restarted, and then it is behind the new epoch).
A process that has seen the new primary refuses the old one outright (fencing); one
that never saw it could still open a session there and hang in its first commit.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Self

import asyncpg

from controlplane.embedded_postgres import REPLICA_NAME, EmbeddedPostgres
from controlplane.eventlog import fencing
from controlplane.settings import env_number

log = logging.getLogger("cairn.failover")
FAILOVER_AFTER_ENV = "CAIRN_GCS_FAILOVER_AFTER_S"
DEFAULT_FAILOVER_AFTER_S = 1.0
_INTERVAL_S = 0.05
_JOIN_TIMEOUT_S = 90.0  # a promotion under way may take a while (pg_promote waits 60 s)


# a primary on another machine is judged over a network: a longer silence, so that a
# short stall of the link does not move the cluster's log to the other machine
DEFAULT_REMOTE_FAILOVER_AFTER_S = 3.0


def failover_after_s(default: float = DEFAULT_FAILOVER_AFTER_S) -> float:
    return env_number(FAILOVER_AFTER_ENV, default, minimum=0.1)


class _Probe:
    """One server's liveness, on a connection of its own (a plain one: on loopback, to
    the server or to a tunnel to it)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: asyncpg.Connection | None = None

    async def answers(self, timeout: float, query: str = "SELECT 1") -> object:
        """The query's answer (SELECT 1: 1), or None if the server did not give one
        within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(self.url, ssl=False)
                return await self._conn.fetchval(query)
        except Exception:
            self.close()
            return None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None


class _Loop(abc.ABC):
    """A watch that runs ``_watch`` in a thread of its own, until stopped or done."""

    name = "cairn-gcs-watch"

    def __init__(self, on_event: Callable[[str], None]) -> None:
        self.on_event = on_event
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(_JOIN_TIMEOUT_S)

    def _run(self) -> None:
        try:
            asyncio.run(self._watch())
        except Exception as exc:  # never silently: the cluster relies on it
            log.exception("%s failed", self.name)
            self.on_event(f"{self.name} failed and watches no more: {exc!r}")
        finally:
            self.done.set()

    @abc.abstractmethod
    async def _watch(self) -> None:
        """The watch itself: returns once it acted, or when ``_stop`` is set."""


class Watchdog(_Loop):
    """Promotes ``replica`` when ``primary`` is gone, or drops ``replica`` when it is
    (see the module's docstring). ``on_event`` hears what it does, in words;
    ``on_promoted`` is called with the replica once it is the primary."""

    name = "the GCS watchdog"

    def __init__(
        self,
        primary: EmbeddedPostgres,
        replica: EmbeddedPostgres,
        *,
        failover_after: float | None = None,
        on_event: Callable[[str], None] = log.warning,
        on_promoted: Callable[[EmbeddedPostgres], None] = lambda _: None,
        server: str = "the GCS",
    ) -> None:
        """``server``: what the messages call the server watched (one of a log on
        several servers: "the GCS's server 1")."""
        super().__init__(on_event)  # (``done``: set once it acted, or gave up)
        self.server = server
        self.primary = primary
        self.replica = replica
        self.failover_after = failover_after_s() if failover_after is None else failover_after
        self.on_promoted = on_promoted
        self.promoted = threading.Event()  # set once the replica is the primary
        self.lost_at: float | None = None  # monotonic: when it found the primary gone
        self.promoted_at: float | None = None  # monotonic: when the replica took writes
        self.epoch: fencing.Epoch | None = None  # the promoted server's

    async def _watch(self) -> None:
        probes = _Probe(self.primary.url), _Probe(self.replica.url)
        primary_seen = replica_seen = time.monotonic()
        try:
            while not self._stop.is_set():
                if not self.primary.running:
                    return self._failover("its process exited")
                if not self.replica.running:
                    return self._drop_replica("its process exited")
                primary_ok, replica_ok = await asyncio.gather(
                    *(probe.answers(self.failover_after / 2) for probe in probes)
                )
                now = time.monotonic()
                if primary_ok:
                    primary_seen = now
                elif now - primary_seen >= self.failover_after and not self._stop.is_set():
                    return self._failover(f"it did not answer for {now - primary_seen:.1f}s")
                if replica_ok:
                    replica_seen = now
                elif now - replica_seen >= self.failover_after and not self._stop.is_set():
                    return self._drop_replica(f"it did not answer for {now - replica_seen:.1f}s")
                await asyncio.sleep(_INTERVAL_S)
        finally:
            for probe in probes:
                probe.close()

    def _failover(self, why: str) -> None:
        self.lost_at = time.monotonic()
        primary, replica = self.primary, self.replica
        self.on_event(
            f"{self.server} primary (port {primary.port}) is gone: {why}; promoting its replica "
            f"(port {replica.port})"
        )
        try:
            primary.kill()  # if it still runs (frozen, cut off): dead before anything else
        except Exception as exc:  # the replica is promoted all the same
            self.on_event(f"{self.server} primary could not be stopped cleanly: {exc!r}")
        if not replica.running:
            self.on_event(f"{self.server} replica is gone too: nothing to promote, it is down")
            return
        replica.promote()
        self.promoted_at = time.monotonic()
        with contextlib.suppress(Exception):  # appenders record it anyway as they connect
            self.epoch = fencing.record_promotion(replica.url)
        self.promoted.set()
        self.on_promoted(replica)
        self.on_event(
            f"{self.server} failed over: the replica (port {replica.port}) is the primary"
            f"{f' at {self.epoch}' if self.epoch else ''}, "
            f"{self.promoted_at - self.lost_at:.2f}s after the primary was found gone; "
            "it has no replica from now on"
        )

    def _drop_replica(self, why: str) -> None:
        self.on_event(
            f"{self.server} replica (port {self.replica.port}) is lost: {why}; the primary goes "
            "on without one (no failover from now on)"
        )
        self.replica.kill()
        self.primary.drop_synchronous_standby()


class RemoteStandbyWatch(_Loop):
    """The primary's side of a replica on another machine (``--gcs-replica-host``).

    Commits wait for the replica from the moment it streams (``make_synchronous``): only
    then is failover armed. The replica is never dropped from here: from this side a
    lost replica and a cut link look alike, and a primary that went on alone while
    the replica, cut off from it, promoted itself would be a second primary taking
    writes. So a lost replica stalls commits until it is back (liveness, not safety).
    And once the replica answers as a primary (it promoted itself: this server was
    unreachable from it), this server is killed: its waiting commits are never
    acknowledged, and every process moves to the promoted one."""

    name = "cairn-gcs-standby-watch"

    def __init__(
        self,
        primary: EmbeddedPostgres,
        replica_url: str,
        *,
        on_event: Callable[[str], None] = log.warning,
        server: str = "the GCS",
    ) -> None:
        """``server``: what the messages call the server watched (as ``Watchdog``)."""
        super().__init__(on_event)
        self.primary = primary
        self.replica_url = replica_url  # plain, to a tunnel to the replica's TLS front
        self.server = server
        self.synchronous = threading.Event()
        self.fenced = threading.Event()  # this server was killed: the replica took over

    async def _watch(self) -> None:
        replica = _Probe(self.replica_url)
        try:
            while not self._stop.is_set():
                if not self.synchronous.is_set() and await asyncio.to_thread(self._streams):
                    await asyncio.to_thread(self.primary.make_synchronous)
                    self.synchronous.set()
                    self.on_event(
                        f"{self.server} replica on the other machine streams: commits wait "
                        "for it from now on, and it takes over if this server is lost"
                    )
                if self.synchronous.is_set():
                    answer = await replica.answers(1.0, "SELECT NOT pg_is_in_recovery()")
                    if answer is True:
                        self.primary.kill()
                        self.fenced.set()
                        self.on_event(
                            f"{self.server} replica on the other machine was promoted (it "
                            "lost this server): this server is stopped, and the cluster goes "
                            "on with the promoted one"
                        )
                        return
                await asyncio.sleep(0.2)
        finally:
            replica.close()

    def _streams(self) -> bool:
        import psycopg

        if not self.primary.running:
            return False
        try:
            with psycopg.connect(self.primary.url, autocommit=True, connect_timeout=5) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_replication "
                    "WHERE application_name = %s AND state = 'streaming'",
                    (REPLICA_NAME,),
                ).fetchone()
        except psycopg.Error:
            return False
        return bool(row and row[0])


class PrimaryWatch(_Loop):
    """The replica's side, on its own machine: promotes it when the primary (reached
    through ``primary_url``, a plain URL to a tunnel to the primary's TLS front) has
    not answered for ``failover_after`` seconds, and starts the replica again if it
    stopped by itself (the primary's commits wait for it)."""

    name = "cairn-gcs-primary-watch"

    def __init__(
        self,
        replica: EmbeddedPostgres,
        primary_url: str,
        *,
        failover_after: float | None = None,
        on_event: Callable[[str], None] = log.warning,
        on_promoted: Callable[[], None] = lambda: None,
        server: str = "the GCS",
    ) -> None:
        super().__init__(on_event)
        self.replica = replica
        self.primary_url = primary_url
        self.server = server  # (as ``Watchdog``'s)
        self.failover_after = (
            failover_after_s(DEFAULT_REMOTE_FAILOVER_AFTER_S)
            if failover_after is None
            else failover_after
        )
        self.on_promoted = on_promoted
        self.promoted = threading.Event()
        self.lost_at: float | None = None
        self.promoted_at: float | None = None

    async def _watch(self) -> None:
        primary = _Probe(self.primary_url)
        seen = time.monotonic()
        try:
            while not self._stop.is_set():
                if not self.replica.running and not self._stop.is_set():
                    self.on_event(f"{self.server} replica stopped by itself; starting it again")
                    await asyncio.to_thread(self.replica.start)
                if await primary.answers(self.failover_after / 2):
                    seen = time.monotonic()
                elif time.monotonic() - seen >= self.failover_after and not self._stop.is_set():
                    await asyncio.to_thread(self._failover, time.monotonic() - seen)
                    return
                await asyncio.sleep(_INTERVAL_S)
        finally:
            primary.close()

    def _failover(self, silent_for: float) -> None:
        self.lost_at = time.monotonic()
        self.on_event(
            f"{self.server} primary on the head's machine did not answer for "
            f"{silent_for:.1f}s: promoting the replica on this machine"
        )
        self.replica.promote()
        self.promoted_at = time.monotonic()
        epoch = None
        with contextlib.suppress(Exception):  # appenders record it anyway as they connect
            epoch = fencing.record_promotion(self.replica.url)
        self.promoted.set()
        self.on_promoted()
        self.on_event(
            f"{self.server} failed over to this machine{f' at {epoch}' if epoch else ''}, "
            f"{self.promoted_at - self.lost_at:.2f}s after the primary was found gone"
        )
