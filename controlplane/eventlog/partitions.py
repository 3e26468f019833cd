"""Partition management: create partitions ahead of need, and retire old ones by
detaching them (``DETACH PARTITION ... CONCURRENTLY``), exporting them to Parquet and
dropping them, all without blocking appends or readers.

Partitions are ranges of position (``[lower_bound, upper_bound)``), recorded with
their fate in ``event_partitions``. Appends also create partitions when they would run
past the last one, so running out is impossible; creating them here, ahead, keeps that
DDL off the append path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql as pgsql
from psycopg.rows import dict_row

from controlplane.errors import GcsError, GcsUnavailableError
from controlplane.gcs_url import normalize, redact
from controlplane.sql import queries


def _one(cursor: psycopg.Cursor[tuple[Any, ...]], what: str) -> tuple[Any, ...]:
    """The row of a query that always returns one (none: the schema is not migrated)."""
    row = cursor.fetchone()
    if row is None:
        raise GcsError(f"the GCS returned no {what}: is its schema migrated?")
    return row


PARQUET_SCHEMA = pa.schema(
    [
        ("position", pa.int64()),
        ("event_id", pa.string()),
        ("recorded_at", pa.timestamp("us", tz="UTC")),
        ("job_id", pa.string()),
        ("entity_kind", pa.string()),
        ("entity_id", pa.string()),
        ("event_type", pa.string()),
        ("node_id", pa.string()),
        ("payload", pa.string()),  # the JSON object as text
        ("data", pa.binary()),
    ]
)
_EXPORT_CHUNK_ROWS = 50_000


@dataclass(frozen=True)
class PartitionInfo:
    table_name: str
    lower_bound: int
    upper_bound: int
    state: str
    created_at: datetime
    detached_at: datetime | None
    archived_to: str | None
    dropped_at: datetime | None


def _pg(name: str, *args: object) -> tuple[str, tuple[object, ...]]:
    """A named query (asyncpg's ``$n`` placeholders, as queries.sql is shared) in
    psycopg's ``%s`` form, with the arguments in the order the placeholders appear."""
    order: list[int] = []

    def placeholder(match: re.Match[str]) -> str:
        order.append(int(match.group(1)) - 1)
        return "%s"

    query = re.sub(r"\$(\d+)", placeholder, queries[name])
    return query, tuple(args[i] for i in order)


_DROP_LOCK_TIMEOUT = "10s"


class PartitionManager:
    def __init__(self, url: str) -> None:
        self.url = normalize(url)

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            raise GcsUnavailableError(f"cannot reach the GCS at {redact(self.url)}: {exc}") from exc

    def configure(self, *, partition_size: int, partitions_ahead: int = 2) -> None:
        """Sets the size of partitions created from now on and how many to keep ahead."""
        with self._connect() as conn:
            conn.execute(*_pg("set_partition_size", partition_size, partitions_ahead))

    def ensure_ahead(self) -> int:
        """Creates partitions so that ``partitions_ahead`` lie beyond the head; returns
        how many were created."""
        with self._connect() as conn:
            row = conn.execute(queries["ensure_partitions"]).fetchone()
        return int(row[0]) if row else 0

    def index_full_partitions(self) -> list[str]:
        """Builds the per-entity history index ``(entity_id, position)`` on every
        attached partition that is full (all its positions handed out) and lacks it,
        with CREATE INDEX CONCURRENTLY: the hot partition never carries it, so appends
        do not pay for it, and building it blocks nothing. Returns the partitions done.

        Building an index is DDL, which only the schema's owner may do: as the runtime
        role (``cairn_runtime``) this skips every partition and returns nothing."""
        done = []
        with self._connect() as conn:
            head = _one(conn.execute(queries["head_position"]), "log head")[0]
            for part in self._all(conn):
                if part.state != "attached" or part.upper_bound > head + 1:
                    continue
                index = f"{part.table_name}_entity_idx"
                missing, may_build = _one(
                    conn.execute(*_pg("partition_index_missing", index, part.table_name)),
                    "answer about an index",
                )
                if not missing or not may_build:
                    continue
                conn.execute(
                    pgsql.SQL(
                        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} (entity_id, position)"
                    ).format(pgsql.Identifier(index), pgsql.Identifier(part.table_name))
                )
                done.append(part.table_name)
        return done

    def seal_full_partitions(self) -> int:
        """Stamps every partition whose positions are all handed out and settled with the
        time, after every event in it was recorded, and redefines the view of the recent
        partitions an append's duplicate check reads when they may hold every copy of its
        ids (those sealed before its ids were made do not: migration 0030), so the check's
        cost does not grow with the log. Returns how many were sealed (0 also when a
        shard's lock is held: the next round seals)."""
        with self._connect() as conn:
            row = conn.execute(queries["seal_partitions"]).fetchone()
        return int(row[0]) if row else 0

    def maintain(self) -> None:
        """The periodic upkeep: partitions ahead of the head; behind it, sealed and given
        their history indexes."""
        self.ensure_ahead()
        self.seal_full_partitions()
        self.index_full_partitions()

    def partitions(self) -> list[PartitionInfo]:
        """Every partition the log has had, in position order, with its state."""
        with self._connect() as conn:
            return self._all(conn)

    def detach(self, table_name: str) -> None:
        """Detaches a partition whose positions are all handed out already.

        Uses DETACH ... CONCURRENTLY, which waits for queries that may be reading it
        but never blocks appends; an interrupted detach is finished (FINALIZE)."""
        with self._connect() as conn:
            part = self._get(conn, table_name)
            if part.state != "attached":
                raise GcsError(f"partition {table_name} is {part.state}, not attached")
            # (settled: of a sharded log, an append in flight may still take a position
            # below the highest handed out)
            head = _one(conn.execute(queries["settled_position"]), "log head")[0]
            if part.upper_bound > head + 1:
                raise GcsError(
                    f"partition {table_name} [{part.lower_bound}, {part.upper_bound}) still "
                    f"receives appends (head is at {head}); only full partitions can be detached"
                )
            ident = pgsql.Identifier(table_name)
            try:
                conn.execute(
                    pgsql.SQL("ALTER TABLE events DETACH PARTITION {} CONCURRENTLY").format(ident)
                )
            except psycopg.errors.ObjectNotInPrerequisiteState:
                conn.execute(
                    pgsql.SQL("ALTER TABLE events DETACH PARTITION {} FINALIZE").format(ident)
                )
            conn.execute(*_pg("mark_partition_detached", table_name))

    def export_parquet(self, table_name: str, directory: Path) -> Path:
        """Writes a detached partition's rows, in position order, to a Parquet file."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{table_name}.parquet"
        with self._connect() as conn:
            part = self._get(conn, table_name)
            if part.state not in ("detached", "archived"):
                raise GcsError(f"partition {table_name} is {part.state}; detach it before export")
            query = pgsql.SQL(
                "SELECT position, event_id::text, recorded_at, job_id, entity_kind::text, "
                "entity_id, event_type, node_id, payload::text, data FROM {} ORDER BY position"
            ).format(pgsql.Identifier(table_name))
            tmp = path.with_suffix(".parquet.tmp")
            with (
                pq.ParquetWriter(tmp, PARQUET_SCHEMA) as writer,
                conn.transaction(),
                conn.cursor(name=f"export_{table_name}") as cur,
            ):
                cur.execute(query)
                while rows := cur.fetchmany(_EXPORT_CHUNK_ROWS):
                    columns = list(zip(*rows, strict=True))
                    writer.write_batch(
                        pa.RecordBatch.from_arrays(
                            [
                                pa.array(col, type=f.type)
                                for col, f in zip(columns, PARQUET_SCHEMA, strict=True)
                            ],
                            schema=PARQUET_SCHEMA,
                        )
                    )
            tmp.rename(path)
            conn.execute(*_pg("mark_partition_archived", table_name, str(path)))
        return path

    def row_count(self, table_name: str) -> int:
        """How many events a partition holds (attached or not: it is a table of its own)."""
        with self._connect() as conn:
            self._get(conn, table_name)  # a partition of the log, not any table
            query = pgsql.SQL("SELECT count(*) FROM {}").format(pgsql.Identifier(table_name))
            return int(_one(conn.execute(query), "count")[0])

    def drop(self, table_name: str) -> None:
        """Drops a partition that was detached (and, usually, archived)."""
        with self._connect() as conn:
            part = self._get(conn, table_name)
            if part.state not in ("detached", "archived"):
                raise GcsError(f"partition {table_name} is {part.state}; detach it before dropping")
            try:
                with conn.transaction():
                    # (out of the recent partitions' view first: a view's table cannot go;
                    # redefining it takes every shard's lock, which an append holds)
                    conn.execute(f"SET LOCAL lock_timeout = '{_DROP_LOCK_TIMEOUT}'")
                    conn.execute(queries["define_recent_event_ids"])
                    conn.execute(pgsql.SQL("DROP TABLE {}").format(pgsql.Identifier(table_name)))
                    conn.execute(*_pg("mark_partition_dropped", table_name))
            except psycopg.errors.LockNotAvailable as exc:
                raise GcsError(
                    f"partition {table_name} was not dropped: an append held a shard's lock "
                    f"for {_DROP_LOCK_TIMEOUT} (a transaction left open?); try again ({exc})"
                ) from exc

    def retire(self, table_name: str, archive_dir: Path | None) -> Path | None:
        """Detach, export (when ``archive_dir`` is given) and drop one partition."""
        self.detach(table_name)
        path = self.export_parquet(table_name, archive_dir) if archive_dir else None
        self.drop(table_name)
        return path

    def _get(self, conn: psycopg.Connection, table_name: str) -> PartitionInfo:
        for part in self._all(conn):
            if part.table_name == table_name:
                return part
        raise GcsError(f"no partition named {table_name!r} in event_partitions")

    @staticmethod
    def _all(conn: psycopg.Connection) -> list[PartitionInfo]:
        with conn.cursor(row_factory=dict_row) as cur:
            return [PartitionInfo(**row) for row in cur.execute(queries["list_partitions"])]


def read_parquet_archive(path: Path) -> pa.Table:
    """An archived partition, back as an Arrow table (query it with pyarrow or DuckDB)."""
    return pq.read_table(path, schema=PARQUET_SCHEMA)
