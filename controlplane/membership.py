"""Node membership: who is in the cluster, how loaded, and who died.

- A node is **registered** by its ``registered`` event (the node daemon appends it).
- **Liveness**: every node daemon pings its row of ``node_liveness`` every
  ``PING_INTERVAL_S``. Pings are not transitions, so they update one row in place and
  never touch the log.
- **Load**: a node appends a ``heartbeat`` event with its available resources and load
  when they changed, at most once per ``HEARTBEAT_MIN_INTERVAL_S``: the log gets at most
  one heartbeat per node per second, however busy the node.
- **Death**: the monitor (run by the head) declares dead every node whose pings stopped
  ``dead_after`` seconds ago (``$CAIRN_NODE_DEAD_AFTER_S``, default 1.5), appending its
  ``dead`` event in the same transaction as the liveness row's ``dead_at``, so a death
  is logged exactly once even with several monitors. A node that stops cleanly does
  the same for itself (``LivenessPinger.leave``). A node declared dead is fenced: its
  next ping finds no live row and its daemon stops; a restarted daemon registers under
  a new id.
- **Bound** (a log on several servers): each ping also renews the node's bound, the
  position its appends to the other servers stay below (``BOUND_AHEAD`` past its clock
  and server 0's heads; migrations/sql/0032_append_bounds.up.sql). A node is fenced on
  every server before its ``dead`` event; on a server that does not answer then, the
  fence is owed (placed once it answers: ``place_owed_fences``) and the ``dead`` event
  goes past the node's last bound instead, which its pings, refused from then on, no
  longer renew: so a node's death waits for no server but server 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from controlplane.errors import GcsIdentityError
from controlplane.eventlog import EVERY_NODE, EntityKind, Event, RecordedEvent
from controlplane.eventlog.appender import append_on
from controlplane.eventlog.clock import PROCESS_CLOCK, AppendBound, LogClock, node_bound
from controlplane.eventlog.connection import (
    DEFAULT_CONNECT_TIMEOUT_S,
    connect,
    is_connection_error,
    is_disk_full,
)
from controlplane.eventlog.servers import fence_node, log_urls
from controlplane.projections.spec import fold
from controlplane.settings import env_number
from controlplane.sql import queries

log = logging.getLogger("cairn.membership")

PING_INTERVAL_S = 0.25
HEARTBEAT_MIN_INTERVAL_S = 1.0
DEAD_AFTER_ENV_VAR = "CAIRN_NODE_DEAD_AFTER_S"
DEFAULT_DEAD_AFTER_S = 1.5
LEAVE_TIMEOUT_S = 5.0
# How far past its clock a node's bound is renewed at each ping: more positions than the
# log hands out between two pings (a million in 0.25 s), so a live node's appends are not
# held back by it; a death declared past a bound puts the log that much further on.
BOUND_AHEAD = 1 << 20
# How often the monitor tries again to place the fences owed on servers that were away,
# and how long it waits for each such server to answer.
OWED_FENCES_INTERVAL_S = 2.0
OWED_FENCE_CONNECT_TIMEOUT_S = 1.0


def dead_after_s() -> float:
    return env_number(DEAD_AFTER_ENV_VAR, DEFAULT_DEAD_AFTER_S, minimum=2 * PING_INTERVAL_S)


def _connection_lost(exc: BaseException, conn: asyncpg.Connection | None) -> bool:
    """Whether ``exc`` says the GCS is away or the connection unusable: then the loop
    goes on with a new one. A server dying mid-request can also leave asyncpg's
    protocol in a state it reports as an internal error ("another operation is in
    progress"), which would otherwise stop the daemon over a failover."""
    if isinstance(exc, GcsIdentityError):  # not this node's log: it must stop
        return False
    return (
        is_connection_error(exc)
        or is_disk_full(exc)  # the GCS cannot write for now: as if away, until it can
        or "GCS" in str(exc)
        or isinstance(exc, asyncpg.InternalClientError)
        or (conn is not None and conn.is_closed())
    )


def _dropped(conn: asyncpg.Connection | None) -> None:
    """Closes a connection found unusable (at once: it may hang on a dead server)."""
    if conn is not None:
        conn.terminate()


class LivenessPinger:
    """A node daemon's pings; ``on_fenced`` is called if the node was declared dead."""

    def __init__(
        self,
        url: str,
        node_id: str,
        address: str,
        on_fenced: Callable[[], None],
        *,
        clock: LogClock = PROCESS_CLOCK,
        bound: AppendBound | None = None,
    ):
        """``clock``: the node's (its bound is renewed past it); ``bound``: where its
        appenders find the bound (``clock.node_bound``, but in tests)."""
        self.url = url
        self.node_id = node_id
        self.address = address
        self.on_fenced = on_fenced
        self.clock = clock
        self.bound = bound if bound is not None else node_bound(node_id)
        self._conn: asyncpg.Connection | None = None

    async def register(self) -> None:
        self._conn = await connect(self.url)
        below = await self._conn.fetchval(
            queries["register_liveness"],
            self.node_id,
            self.address,
            self.clock.position,
            BOUND_AHEAD,
        )
        self.bound.renewed(int(below))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await connect(self.url)
                below = await self._conn.fetchval(
                    queries["ping_liveness"], self.node_id, self.clock.position, BOUND_AHEAD
                )
            except Exception as exc:  # the GCS is away: keep trying, the monitor decides
                if not _connection_lost(exc, self._conn):
                    raise
                _dropped(self._conn)
                self._conn = None
                continue
            if below is None:
                log.error("node %s was declared dead by the cluster; stopping", self.node_id)
                self.on_fenced()
                return
            self.bound.renewed(int(below))

    async def leave(self, dead: Event) -> bool:
        """A clean stop (pings stopped): ends the node's liveness and appends its
        ``dead`` event in one transaction, so neither is without the other. False if
        that could not be done (the GCS is away, or the node was declared dead
        meanwhile): then the monitor declares it dead, as a node that stopped pinging."""
        try:
            return await asyncio.wait_for(self._leave(dead), LEAVE_TIMEOUT_S)
        except Exception as exc:
            log.warning("node %s could not log its own death (%s)", self.node_id, exc)
            return False
        finally:
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None

    async def _leave(self, dead: Event) -> bool:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self.url)
        async with self._conn.transaction():
            if await self._conn.fetchval(queries["declare_node_gone"], self.node_id) is None:
                return False  # declared dead by a monitor already, with its event
            # past every event this process appended, on any server of the log
            await append_on(self._conn, [dead], floor=PROCESS_CLOCK.position or None)
        return True


class MembershipMonitor:
    """Declares silent nodes dead (any number may run: each death is logged once)."""

    def __init__(self, url: str, dead_after: float | None = None) -> None:
        self.url = url
        self.dead_after = dead_after_s() if dead_after is None else dead_after
        self._conn: asyncpg.Connection | None = None

    async def run(self) -> None:
        """Checks every ``PING_INTERVAL_S``. After the GCS was unreachable (a restart, a
        failover), no node could ping meanwhile: nobody is declared dead until
        ``dead_after`` has passed since it answers again, plus the time a node's pinger
        may spend in one attempt to reconnect (``DEFAULT_CONNECT_TIMEOUT_S``: it may be
        waiting on the server that died, or be slower than this monitor to reach the
        new one, from another machine through the TLS front), so that the nodes' pings,
        which resume by themselves, are judged and not the outage."""
        outage = False
        resume_at = 0.0
        owed_at = 0.0
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            try:
                if outage:
                    self._conn = await connect(self.url)
                    outage = False
                    resume_at = time.monotonic() + self.dead_after + DEFAULT_CONNECT_TIMEOUT_S
                if time.monotonic() >= resume_at:
                    await self.check_once()
                if time.monotonic() >= owed_at:
                    owed_at = time.monotonic() + OWED_FENCES_INTERVAL_S
                    await self.place_owed_fences()
            except Exception as exc:
                if not _connection_lost(exc, self._conn):
                    raise
                _dropped(self._conn)
                self._conn, outage = None, True

    async def place_owed_fences(self) -> list[tuple[str, int]]:
        """Places the fences owed on servers that did not answer when their nodes were
        declared dead, on those that answer now; returns those placed, (node, server).
        A server still away is tried once a round, for ``OWED_FENCE_CONNECT_TIMEOUT_S``
        at most (the checks wait meanwhile)."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self.url)
        conn = self._conn
        owed = await conn.fetch(queries["fences_owed"])
        if not owed:
            return []
        urls = await log_urls(self.url)
        placed: list[tuple[str, int]] = []
        away: set[int] = set()
        for row in owed:
            node_id, server = row["node_id"], row["server_index"]
            if server in away or await fence_node(
                [urls[server]],
                node_id,
                LogClock(),
                away_ok=True,
                timeout=OWED_FENCE_CONNECT_TIMEOUT_S,
            ):
                away.add(server)
                continue
            await conn.execute(queries["fence_placed"], node_id, server)
            log.info("node %s is now fenced on the log's server %d too", node_id, server)
            placed.append((node_id, server))
        return placed

    async def check_once(self) -> list[str]:
        """Declares the nodes silent for ``dead_after`` seconds dead; returns their ids."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self.url)
        conn = self._conn
        async with conn.transaction():
            stale = await conn.fetch(queries["declare_stale_nodes_dead"], self.dead_after)
            if stale:
                floor, owed = await fenced_everywhere(
                    self.url, {row["node_id"]: row["appends_below"] for row in stale}
                )
                deaths = [
                    Event(
                        EntityKind.NODE,
                        row["node_id"],
                        "dead",
                        {
                            "cause": (
                                f"missed heartbeats: no liveness ping for more than "
                                f"{self.dead_after:g}s (last at {row['last_ping']})"
                            ),
                            "to_node": EVERY_NODE,
                            **_owed_on(owed, row["node_id"]),
                        },
                        node_id=row["node_id"],
                    )
                    for row in stale
                ]
                await _owe(conn, owed)
                await append_on(conn, deaths + await _jobs_failed_with(conn, stale), floor=floor)
        for row in stale:
            log.warning("node %s declared dead (missed heartbeats)", row["node_id"])
        return [row["node_id"] for row in stale]

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)


async def fenced_everywhere(
    url: str, bounds: dict[str, int | None]
) -> tuple[int | None, list[tuple[str, int]]]:
    """Fences nodes declared dead (each with its bound, None if it never had one) on the
    log's other servers (server 0 fences them with their liveness rows), before their
    ``dead`` events. Returns the position those events must go past (None on a log of
    one server): every event the nodes got in, on any server, is below it -- on a server
    fenced now, by ``servers.fence_node``; on one that did not answer, by the node's
    bound, which that server holds its appends below -- and the fences owed, (node,
    server index), for ``place_owed_fences``. A node with no bound waits for every
    server (GcsUnavailableError while one does not answer)."""
    others = (await log_urls(url))[1:]
    if not others:
        return None, []
    clock = LogClock()
    owed: list[tuple[str, int]] = []
    away: set[int] = set()  # (indexes in others) found away for a node before: not tried again
    for node_id, below in bounds.items():
        tried = [i for i in range(len(others)) if below is None or i not in away]
        found = await fence_node(
            [others[i] for i in tried], node_id, clock, away_ok=below is not None
        )
        away.update(tried[i] for i in found)
        if below is not None and away:
            clock.saw(below)
            owed += [(node_id, index + 1) for index in sorted(away)]
    return clock.position, owed


def _owed_on(owed: list[tuple[str, int]], node_id: str) -> dict[str, list[int]]:
    """The ``fence_owed_on`` of a node's ``dead`` event, if any fence of it is owed."""
    servers = [server for node, server in owed if node == node_id]
    return {"fence_owed_on": servers} if servers else {}


async def _owe(conn: asyncpg.Connection, owed: list[tuple[str, int]]) -> None:
    for node_id, server in owed:
        await conn.execute(queries["owe_fence"], node_id, server)
        log.warning(
            "node %s is declared dead without its fence on the log's server %d, which does "
            "not answer: its appends there stay below its bound; the fence is placed once "
            "the server answers",
            node_id,
            server,
        )


async def _jobs_failed_with(conn: asyncpg.Connection, stale: list[Any]) -> list[Event]:
    """The ``failed`` events of the job submissions whose driver ran on a node declared
    dead now (controlplane/jobs.py): not left RUNNING with nothing running them."""
    nodes = [row["node_id"] for row in stale]
    found = await conn.fetch(queries["submissions_running_on"], nodes)
    return [
        Event(
            EntityKind.SUBMISSION,
            row["entity_id"],
            "failed",
            {
                "error": f"The node of the job's driver ({row['driver_node_id']}) was "
                "declared dead (missed heartbeats); the driver is taken as gone with it.",
                "error_type": "JOB_SUPERVISOR_ACTOR_DIED",
            },
        )
        for row in found
    ]


async def infeasible_tasks(url: str) -> list[tuple[str, str, dict[str, float]]]:
    """(kind, id, resources) of the tasks and actors no node of the cluster can run."""
    conn = await connect(url)
    try:
        rows = await conn.fetch(queries["infeasible_tasks"])
    finally:
        await conn.close()
    return [(row["kind"], row["task_id"], json.loads(row["resources"])) for row in rows]


async def cluster_nodes(url: str) -> list[dict[str, Any]]:
    """Every node of the cluster, as the ``nodes`` projection's rows, folded from the
    log's node events (oldest registration first), each with what its registration
    says beyond the projection's columns: ``head``, ``hostname``, ``socket`` (its
    daemon's socket path; these two None if it registered without them) and
    ``labels`` (None if it registered without them)."""
    conn = await connect(url)
    try:
        rows = await conn.fetch(queries["node_events"])
    finally:
        await conn.close()
    events = [RecordedEvent.from_row(row) for row in rows]
    registered = {e.entity_id: e.payload for e in events if e.event_type == "registered"}
    state = fold(events)
    return [
        {
            **row,
            "head": bool(registered.get(row["node_id"], {}).get("head")),
            "hostname": registered.get(row["node_id"], {}).get("hostname"),
            "socket": registered.get(row["node_id"], {}).get("socket"),
            "labels": registered.get(row["node_id"], {}).get("labels"),
        }
        for (table, _), row in state.items()
        if table == "nodes"
    ]


RESTARTED_CAUSE = "its node daemon died and a new one took its place (with its store)"


async def declare_restarted(url: str, node_id: str) -> bool:
    """A node's process found its daemon dead and starts another: declares the old id
    dead at once (the monitor would, ``dead_after`` later) with a cause that tells the
    other nodes that the objects it held for them are still there, with the daemon
    that adopts them at the same address. False if the monitor was first: then the
    other nodes rebuild those objects, and the new daemon must not adopt them."""
    conn = await connect(url)
    try:
        async with conn.transaction():
            row = await conn.fetchrow(queries["declare_node_restarted"], node_id)
            if row is None:
                return False
            floor, owed = await fenced_everywhere(url, {node_id: row["appends_below"]})
            payload = {"cause": RESTARTED_CAUSE, "to_node": EVERY_NODE, **_owed_on(owed, node_id)}
            await _owe(conn, owed)
            await append_on(conn, [Event(EntityKind.NODE, node_id, "dead", payload)], floor=floor)
        return True
    finally:
        await conn.close()
