"""Retention (``cairn gc``): whole partitions of the log whose newest event is older
than a cutoff are retired -- detached concurrently, exported to Parquet when an
archive directory is given, and dropped -- so that the log stays small without ever
blocking appends.

Only full partitions are candidates (every position in their range handed out), so
the partition receiving appends is never touched, and a partition is judged by its
newest event, so no retained event is younger than the cutoff. Ages are measured by
the server's clock, the one that stamped ``recorded_at``. Before a partition is
dropped, its archive must hold exactly as many rows as it did.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq

from controlplane.errors import GcsError
from controlplane.eventlog.connection import connect
from controlplane.eventlog.partitions import PartitionManager
from controlplane.sql import queries

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``30s``, ``15m``, ``12h``, ``7d`` or ``2w``."""
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30s, 15m, 12h, 7d or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class FullPartition:
    """An attached partition no longer receiving appends, with what gc judges it by."""

    table_name: str
    lower_bound: int
    upper_bound: int
    events: int
    newest: datetime | None
    cutoff: datetime | None
    state: str = "attached"  # or "detached"/"archived": left so by a gc that stopped
    archived_to: str | None = None

    @property
    def expired(self) -> bool:
        return self.newest is not None and self.cutoff is not None and self.newest < self.cutoff


@dataclass(frozen=True)
class Retired:
    partition: FullPartition
    archived_to: Path | None


async def full_partitions(url: str, older_than_s: float) -> list[FullPartition]:
    """Every full attached partition, in position order, judged against the cutoff."""
    conn = await connect(url)
    try:
        rows = await conn.fetch(queries["retention_full_partitions"], older_than_s)
    finally:
        await conn.close()
    return [FullPartition(**dict(row)) for row in rows]


def unfinished(url: str) -> list[FullPartition]:
    """Partitions an earlier gc left detached or archived (it stopped part way): out of
    ``events`` already, still on disk; gc finishes them first."""
    manager = PartitionManager(url)
    return [
        FullPartition(
            info.table_name,
            info.lower_bound,
            info.upper_bound,
            manager.row_count(info.table_name),
            None,
            None,
            info.state,
            info.archived_to,
        )
        for info in manager.partitions()
        if info.state in ("detached", "archived")
    ]


def retire(manager: PartitionManager, part: FullPartition, archive_dir: Path | None) -> Retired:
    """Detaches one expired partition, archives it (checking the row count), drops it;
    a partition left detached or archived by an earlier gc goes on from there."""
    if part.state == "attached":
        manager.detach(part.table_name)
    path = Path(part.archived_to) if part.state == "archived" and part.archived_to else None
    if archive_dir is not None and part.state != "archived":
        path = manager.export_parquet(part.table_name, archive_dir)
        rows = pq.ParquetFile(path).metadata.num_rows
        if rows != part.events:
            raise GcsError(
                f"the archive {path} holds {rows} rows but {part.table_name} held "
                f"{part.events}; the partition is detached but kept, not dropped"
            )
    manager.drop(part.table_name)
    return Retired(part, path)


def collect(
    url: str,
    expired: list[FullPartition],
    archive_dir: Path | None,
    report: Callable[[Retired], None] = lambda _: None,
) -> list[Retired]:
    """Retires the expired partitions oldest first, reporting each as it goes. A
    failure part way leaves the ones done retired, the one at hand detached or archived
    (its events out of ``events`` but kept, see ``cairn partitions list``) and the rest
    attached; the next gc finishes the one at hand first (``unfinished``)."""
    manager = PartitionManager(url)
    done = []
    for part in expired:
        done.append(retire(manager, part, archive_dir))
        report(done[-1])
    return done


def describe(retired: Retired) -> str:
    part = retired.partition
    newest = (
        f"newest {part.newest:%Y-%m-%d %H:%M:%S%z}"
        if part.newest is not None
        else f"left {part.state} by an earlier gc"
    )
    span = f"[{part.lower_bound}, {part.upper_bound})"
    what = f"{part.table_name} {span}: {part.events} events, {newest}"
    if retired.archived_to is None:
        return f"dropped {what}; not archived, these events are gone"
    return f"retired {what}; archived to {retired.archived_to}"
