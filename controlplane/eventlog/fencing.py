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
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from controlplane.errors import GcsError, GcsFencedError
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
    """The epoch of the server behind ``conn``, accepted (see :func:`accept`); None
    where the log has no epochs (a schema before migration 0011), or this login may not
    ask (it may not append either) or record a promotion (a read-only session)."""
    try:
        row = await conn.fetchrow(queries["gcs_epoch"])
    except (
        asyncpg.UndefinedFunctionError,
        asyncpg.InsufficientPrivilegeError,
        asyncpg.ReadOnlySQLTransactionError,  # a read-only session of a just promoted server
    ):
        return None
    if row is None or row["epoch"] is None:
        return None
    return accept(_epoch(row), url)


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
