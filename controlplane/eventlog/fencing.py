"""Fencing after failover: never two primaries taking one process's writes.

When the watchdog promotes a replica (``controlplane/failover.py``), the promoted
server starts a new PostgreSQL timeline, and ``cairn_epoch_v1()`` (migration 0011)
records a new *epoch* in the log's database: the promotion's number, its timeline and a
random id. Every connection the runtime opens to the log (``connection.connect``:
appenders, tailers, pings, the monitor) asks the server for its epoch first and checks
it against the highest epoch this process has seen for that log (a log is its server's
system identifier and its database: a replica and any physical copy share them):

* lower: the server is an old primary that came back (restarted, or a restored copy of
  it): refused with :class:`GcsFencedError`, naming both epochs;
* equal with another id: a second server promoted from the same past (a fork):
  refused likewise;
* higher: the process moves on to it, and from then on refuses anything older.

The check is per process, so a process that has seen the new primary never writes to
the old one again, whichever of its connections reconnects. A process that never saw
the new epoch (started after the failover, and sent to the old primary) cannot tell;
what protects it is synchronous replication: the old primary cannot acknowledge a
commit without its replica, which follows it no more (see ``failover.py``).

**Identity** (migration 0013). The same first query also answers which log the server
holds: its cluster id (drawn once per log) and the server's system identifier, and the
log's head position. A process that serves one cluster (a node daemon, the global
scheduler) calls :func:`remember` at start; from then on the first log it reaches is
*its* log, and every later connection must reach that log again, at a head no lower than
the highest position the process has seen (its tailers and appenders report them,
:func:`saw`). Otherwise it raises :class:`GcsIdentityError`, naming both, and is not
retried:

* another cluster id or server identifier, or no log (a database that is gone or
  empty): the GCS was wiped, or another server answers at its address;
* the same log ending below a position seen: it was put back from an older copy (a
  restored backup) and misses what came after; going on would hand out those positions,
  and the ids made since, a second time.

A node's daemon keeps what it saw in its session directory (``gcs_identity.json``,
written at most once a second), so the daemon that replaces it after a crash (and the
head's scheduler) remembers too. A standby's head may lag behind by design, so it is not
held to the position.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from controlplane.errors import GcsError, GcsFencedError, GcsIdentityError
from controlplane.gcs_url import redact
from controlplane.sql import queries


@dataclass(frozen=True)
class Epoch:
    """A server's epoch, as ``cairn_epoch_v1()`` reports it."""

    system_id: int
    database: str
    epoch: int
    epoch_id: str
    timeline: int

    @property
    def log(self) -> tuple[int, str]:
        return (self.system_id, self.database)

    def __str__(self) -> str:
        return f"epoch {self.epoch} (timeline {self.timeline}, id {self.epoch_id[:8]})"


_highest: dict[tuple[int, str], Epoch] = {}  # by log: the highest epoch seen
_lock = threading.Lock()


def highest_seen(log: tuple[int, str]) -> Epoch | None:
    """The highest epoch this process has accepted for ``log``."""
    with _lock:
        return _highest.get(log)


def accept(epoch: Epoch, url: str) -> Epoch:
    """Records ``epoch`` as seen, or raises GcsFencedError if a server at it is behind
    (or beside) what this process has seen of the same log."""
    with _lock:
        seen = _highest.get(epoch.log)
        if seen is not None:
            if epoch.epoch < seen.epoch:
                raise GcsFencedError(
                    f"refusing the GCS at {redact(url)}: it is at {epoch}, behind {seen} "
                    f"that this process has already seen (an old primary, back after its "
                    f"replica was promoted)"
                )
            if epoch.epoch == seen.epoch and epoch.epoch_id != seen.epoch_id:
                raise GcsFencedError(
                    f"refusing the GCS at {redact(url)}: it is at {epoch}, while this "
                    f"process has seen {seen}: two servers were promoted from the same "
                    f"past (a fork)"
                )
        if seen is None or epoch.epoch > seen.epoch:
            _highest[epoch.log] = epoch
        return epoch


async def check(conn: asyncpg.Connection, url: str) -> Epoch | None:
    """The epoch of the server behind ``conn``, accepted (see :func:`accept`), and, in a
    process that remembers its log (:func:`remember`), the log's identity and head
    checked (:func:`check_identity`); None where the log has no epochs (a schema before
    migration 0011), or this login may not ask (it may not append either) or record a
    promotion (a read-only session)."""
    # what was seen before the query is sent: the server's answer must cover it (a
    # position another connection reports while the query runs may be newer than it)
    before = _seen_now()
    try:
        row = await conn.fetchrow(queries["gcs_identity"])
        identified = True
    except (
        asyncpg.UndefinedFunctionError,
        asyncpg.UndefinedColumnError,
        asyncpg.InsufficientPrivilegeError,
    ):
        identified = False  # a schema before 0013 (or 0021): the epoch alone
        try:
            row = await conn.fetchrow(queries["gcs_epoch"])
        except (asyncpg.UndefinedFunctionError, asyncpg.InsufficientPrivilegeError):
            row = None
        except asyncpg.ReadOnlySQLTransactionError:
            return None
    except asyncpg.ReadOnlySQLTransactionError:  # a read-only session of a just promoted server
        return None
    if row is None or row["epoch"] is None:
        check_identity(None, url)
        return None
    epoch = accept(_epoch(row), url)  # first: an old primary is fenced, not refused
    server = _server_of(row if identified else None)
    seen = before.get(server) if before is not None else None
    check_identity(row if identified else None, url, seen=seen)
    _epoch_of[conn] = (server, epoch.epoch)
    return epoch


def record_promotion(url: str) -> Epoch:
    """Records the promotion of the server at ``url`` as a new epoch (if not yet
    recorded: the first process to connect does it too) and returns its epoch, which
    this process accepts: for the watchdog, right after it promoted a replica."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, autocommit=True, connect_timeout=10, row_factory=dict_row) as conn:
        row = conn.execute(queries["gcs_epoch"]).fetchone()
    if row is None or row["epoch"] is None:
        raise GcsError(f"the GCS at {redact(url)} has no epochs (not migrated to 0011?)")
    return accept(_epoch(row), url)


def _epoch(row: Mapping[str, Any]) -> Epoch:
    return Epoch(
        int(row["system_id"]),
        row["database"],
        int(row["epoch"]),
        row["epoch_id"],
        int(row["timeline"]),
    )


# -- identity: the one log a node serves ----------------------------------------------

IDENTITY_FILE = "gcs_identity.json"  # in a node's session directory
REFUSED_FILE = "gcs_refused"  # there too: why its daemon refused the GCS
IDENTITY_FILE_ENV = "CAIRN_GCS_IDENTITY_FILE"  # the head's file, for its scheduler
GCS_REFUSED_EXIT = 78  # a daemon's (or scheduler's) exit code after refusing the GCS
SAVE_EVERY_S = 1.0


@dataclass(frozen=True)
class Identity:
    """Which log a server holds: the cluster id its first migration drew and the
    server's system identifier."""

    cluster_id: str
    system_id: int

    def __str__(self) -> str:
        return f"cluster id {self.cluster_id} on server {self.system_id}"


@dataclass
class _Seen:
    """What a process saw of one server of its log."""

    identity: Identity | None = None
    # the highest position seen at the highest epoch seen: a failover may lose events a
    # tailer read on the old primary and that were never acknowledged (their writers
    # append them again), so positions are compared within one epoch only
    epoch: int = 0
    position: int = 0


@dataclass
class _Memory:
    path: Path | None
    save: bool
    # per server of the log (one, or several: controlplane/log_servers.py), by its index
    servers: dict[int, _Seen] = field(default_factory=dict)
    saved: dict[int, tuple[int, int]] = field(default_factory=dict)  # (epoch, position)
    saved_at: float = -math.inf


_memory: _Memory | None = None
# the server and epoch each checked connection was accepted at, for ``saw``
_epoch_of: weakref.WeakKeyDictionary[asyncpg.Connection, tuple[int, int]] = (
    weakref.WeakKeyDictionary()
)


def _server_of(row: Mapping[str, Any] | None) -> int:
    """Which server of its log answered (``gcs_identity``): 0 for a log on one."""
    index = None if row is None else row.get("server_index")
    return 0 if index is None else int(index)


def remember(path: Path | None = None, *, save: bool = True) -> None:
    """Pins this process to the one log it serves (node daemons, the global scheduler):
    the first log it reaches at each server's address, or the one an earlier process of
    its node saw (read from ``path``, if there). From now on every connection must reach
    that log again, at a head no lower than what was seen there
    (:func:`check_identity`). With ``save``, what is seen is kept in ``path`` for the
    process that replaces this one (at most once a second, and at :func:`flush`)."""
    global _memory
    memory = _Memory(path, save and path is not None)
    if path is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            for index, known in json.loads(Path(path).read_text())["servers"].items():
                seen = _Seen(
                    Identity(str(known["cluster_id"]), int(known["system_id"])),
                    int(known["epoch"]),
                    int(known["position"]),
                )
                memory.servers[int(index)] = seen
                memory.saved[int(index)] = (seen.epoch, seen.position)
    with _lock:
        _memory = memory


def forget() -> None:
    """Unpins this process (a test that plays several nodes in turn)."""
    global _memory
    with _lock:
        _memory = None


def remembered(server: int = 0) -> tuple[Identity | None, int, int] | None:
    """The log this process serves (its ``server``), the epoch and the highest position
    seen there; None if this process is not pinned."""
    memory = _memory
    if memory is None:
        return None
    seen = memory.servers.get(server, _Seen())
    return (seen.identity, seen.epoch, seen.position)


def _seen_now() -> dict[int, tuple[int, int]] | None:
    memory = _memory
    if memory is None:
        return None
    with _lock:
        return _positions(memory)


def epoch_of(conn: asyncpg.Connection) -> int | None:
    """The epoch of the server behind ``conn``, as checked when it was opened."""
    found = _epoch_of.get(conn)
    return None if found is None else found[1]


def saw(position: int, conn: asyncpg.Connection | None) -> None:
    """The log holds ``position`` (appended or read on ``conn``): a log of the same
    identity and epoch found later below it was put back from an older copy."""
    memory = _memory
    found = _epoch_of.get(conn) if memory is not None and conn is not None else None
    if memory is None or found is None:
        return
    key, epoch = found
    with _lock:
        seen = memory.servers.setdefault(key, _Seen())
        if epoch < seen.epoch or (epoch == seen.epoch and position <= seen.position):
            return  # (a connection to an old primary that is still open: not the log now)
        seen.epoch, seen.position = epoch, position
    if memory.save and time.monotonic() - memory.saved_at >= SAVE_EVERY_S:
        _save(memory)


def flush() -> None:
    """Writes what this process saw now (a daemon stopping)."""
    memory = _memory
    if memory is not None and memory.save and memory.saved != _positions(memory):
        _save(memory)


def _positions(memory: _Memory) -> dict[int, tuple[int, int]]:
    return {key: (seen.epoch, seen.position) for key, seen in memory.servers.items()}


def _save(memory: _Memory) -> None:
    memory.saved_at = time.monotonic()
    if memory.path is None:
        return
    with _lock:
        servers = {
            str(key): {
                "cluster_id": seen.identity.cluster_id,
                "system_id": seen.identity.system_id,
                "epoch": seen.epoch,
                "position": seen.position,
            }
            for key, seen in memory.servers.items()
            if seen.identity is not None
        }
        positions = {key: _positions(memory)[key] for key in map(int, servers)}
    if not servers:
        return
    temporary = memory.path.with_name(f".{memory.path.name}.{os.getpid()}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"servers": servers}, f)
        os.replace(temporary, memory.path)
        memory.saved = positions
    except OSError:  # the session directory is going away: nothing left to protect
        with contextlib.suppress(OSError):
            temporary.unlink()


def check_identity(
    row: Mapping[str, Any] | None, url: str, *, seen: tuple[int, int] | None = None
) -> None:
    """In a process that remembers its log: adopts the log of ``row`` (the answer of
    ``gcs_identity``; None: the server has no log with an identity) if it has none yet,
    else raises GcsIdentityError unless it is the same log, at a head no lower than the
    highest position seen at its epoch (``seen``: (epoch, position) as they were when
    the query was sent; by default as they are now). A later epoch, a failover since,
    starts afresh from its head; a standby is not held to it: its head may lag."""
    memory = _memory
    if memory is None:
        return
    key = _server_of(row)
    found = None if row is None else Identity(str(row["cluster_id"]), int(row["system_id"]))
    where = f"refusing the GCS at {redact(url)}"
    with _lock:
        server = memory.servers.setdefault(key, _Seen())
        known = server.identity if row is not None else _any_identity(memory)
        seen_epoch, seen_position = seen if seen is not None else (server.epoch, server.position)
        if known is not None and found is None:
            raise GcsIdentityError(
                f"{where}: it holds no Cairn log with an identity (an empty database, or "
                f"one migrated before 0013), while this node was using {known}: the GCS "
                "was wiped or replaced. Going on would hand out positions and ids the "
                "cluster already used; this node stops"
            )
        if row is None or found is None:
            return  # nothing to pin to yet (a schema before 0013)
        if known is not None and found != known:
            raise GcsIdentityError(
                f"{where}: it holds another log ({found}) than the one this node was "
                f"using ({known}): the GCS was wiped and made anew, or another server "
                "answers at its address. Going on would hand out positions and ids the "
                "cluster already used; this node stops"
            )
        epoch, head = int(row["epoch"]), int(row["head_position"])
        if epoch < server.epoch and not row["standby"]:  # (seen by an earlier daemon)
            raise GcsFencedError(
                f"refusing the GCS at {redact(url)}: it is at epoch {epoch}, behind epoch "
                f"{server.epoch} that this node has already seen (an old primary, or a copy "
                "from before the failover)"
            )
        if row["standby"]:
            return
        if known is not None and epoch == seen_epoch and head < seen_position:
            raise GcsIdentityError(
                f"{where}: its log ({found}) ends at position {head:,}, below position "
                f"{seen_position:,} that this node has already seen (both at epoch {epoch}: no "
                "failover between): it was put back from an older "
                f"copy (a restored backup), and what came after position {head:,} is "
                f"missing from it. Going on would hand out positions {head + 1:,} to "
                f"{seen_position:,} (and the ids made since) a second time; this node stops"
            )
        changed = known is None or epoch > server.epoch or head > server.position
        server.identity = found
        if epoch > server.epoch:  # (a failover since, or the first log reached)
            server.epoch, server.position = epoch, head
        elif head > server.position:  # the log holds them: a copy without them is behind
            server.position = head
    if changed and memory.save:
        _save(memory)


def _any_identity(memory: _Memory) -> Identity | None:
    """The log a process served (server 0's, or another's), for a server that holds none
    now: it cannot say which of the log's servers it was."""
    return next((s.identity for _, s in sorted(memory.servers.items()) if s.identity), None)


def gone(url: str, exc: BaseException) -> GcsIdentityError | None:
    """For a process that remembers its log: the refusal of a GCS whose database is
    gone (``exc``: the server says it does not exist), else None."""
    memory = _memory
    known = None if memory is None else _any_identity(memory)
    if known is None:
        return None
    said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return GcsIdentityError(
        f"refusing the GCS at {redact(url)}: its database is gone ({said}), while this node "
        f"was using {known} there: the GCS was wiped. Going on would hand out "
        "positions and ids the cluster already used; this node stops"
    )


def record_refusal(session_dir: Path, error: GcsIdentityError) -> None:
    """Leaves why a node's daemon refused the GCS in its session directory, for the node
    process that started it (which stops rather than start another)."""
    with contextlib.suppress(OSError):
        (Path(session_dir) / REFUSED_FILE).write_text(str(error))


def refusal(session_dir: Path) -> str | None:
    """Why a node's daemon refused the GCS (see :func:`record_refusal`), if it did."""
    try:
        return (Path(session_dir) / REFUSED_FILE).read_text()
    except OSError:
        return None
