"""One read-only SQL statement against the log (``cairn sql``).

Three guards, so that neither a mistake nor a crafted statement can change the log:
the statement must start as a read (SELECT, WITH, TABLE, VALUES, EXPLAIN, SHOW); it
runs as a prepared statement, which PostgreSQL refuses to hold more than one command;
and it runs in a READ ONLY transaction as the ``cairn_audit`` role (migration 0007:
SELECT on the log's tables, nothing else), so a write hidden in a WITH clause or a
function is refused by the server itself.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from controlplane.errors import GcsError
from controlplane.eventlog.connection import connect

AUDIT_ROLE = "cairn_audit"
READS = ("select", "with", "table", "values", "explain", "show")
# Audit queries scan and group much of the log: room to hash in memory, and no JIT
# (compiling the views' many aggregates costs more than it saves at 10^6 events).
AUDIT_SETTINGS = "SET LOCAL work_mem = '64MB'; SET LOCAL jit = off"
# The whole log, on however many servers it lies (migrations/sql/0023): its union schema
# first, so `events` and every view read all of them.
WHOLE_LOG = (
    "SELECT set_config('search_path', 'log_union, ' || current_setting('search_path'), true)"
)
# ... or without some of its servers (a session's temporary views, which come first)
UNION_WITHOUT = "SELECT cairn_log_union_without_v1($1::smallint[])"
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


class WriteRefusedError(GcsError):
    """The statement would write, or is not one statement: nothing was run."""


def first_keyword(statement: str) -> str:
    """The statement's first word, comments and parentheses aside."""
    words = _COMMENTS.sub(" ", statement).lstrip(" \t\r\n(").split(None, 1)
    return words[0].lower() if words else ""


@contextlib.asynccontextmanager
async def audit_transaction(
    url: str, *, timeout: float | None = None, without: Sequence[int] = ()
) -> AsyncIterator[asyncpg.Connection]:
    """A connection in a READ ONLY transaction as ``cairn_audit`` (where this login may
    take that role), for queries written here rather than given by a user; with
    ``timeout``, each statement gets that many seconds (and connecting, at least one).
    ``without``: servers of the log left out of its union (they do not answer): the
    session reads the others' events only (migration 0031)."""
    conn = await (connect(url) if timeout is None else connect(url, timeout=max(timeout, 1.0)))
    try:
        audit = await conn.fetchval(
            "SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles WHERE rolname = $1",
            AUDIT_ROLE,
        )
        await leave_out_servers(conn, without, as_audit=bool(audit))
        async with conn.transaction(readonly=True):
            if audit:
                await conn.execute(f"SET LOCAL ROLE {AUDIT_ROLE}")
            await conn.execute(AUDIT_SETTINGS)
            await conn.execute(WHOLE_LOG)
            if timeout is not None:
                await conn.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}")
            yield conn
    finally:
        await conn.close()


async def leave_out_servers(
    conn: asyncpg.Connection, without: Sequence[int], *, as_audit: bool = False
) -> None:
    """From now on ``conn`` reads the log's union without the servers ``without`` (they
    do not answer): its session's own temporary views (migration 0031), made before its
    read-only transaction begins (``as_audit``: made as ``cairn_audit``, who reads them)."""
    if not without:
        return
    async with conn.transaction():
        if as_audit:
            await conn.execute(f"SET LOCAL ROLE {AUDIT_ROLE}")
        await conn.execute(UNION_WITHOUT, sorted(set(without)))


async def run_readonly(
    url: str,
    statement: str,
    args: Sequence[Any] = (),
    *,
    limit: int | None = None,
    without: Sequence[int] = (),
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The column names and rows of one read-only statement; WriteRefusedError if it
    is not one (nothing is run), or if it tries to write (it is rolled back). With
    ``limit``, at most ``limit + 1`` rows are read from the server (one more than asked
    says there are more) and the rest are never sent. ``without``: as for
    ``audit_transaction``."""
    keyword = first_keyword(statement)
    if keyword not in READS:
        raise WriteRefusedError(
            f"cairn sql runs one read-only statement ({', '.join(r.upper() for r in READS)});"
            f" refusing {keyword.upper() or 'an empty statement'!s}"
        )
    try:
        async with audit_transaction(url, without=without) as conn:
            prepared = await conn.prepare(statement)
            if limit is None:
                rows = await prepared.fetch(*args)
            else:
                rows = await (await prepared.cursor(*args)).fetch(limit + 1)
            columns = [attribute.name for attribute in prepared.get_attributes()]
    except asyncpg.PostgresSyntaxError as exc:
        if "multiple commands" in str(exc):
            raise WriteRefusedError(
                "cairn sql runs one statement at a time; the input holds several "
                "(one of them could hide a write)"
            ) from None
        raise
    except (asyncpg.ReadOnlySQLTransactionError, asyncpg.InsufficientPrivilegeError) as exc:
        raise WriteRefusedError(f"refused, the statement writes: {exc}") from None
    return columns, [tuple(row.values()) for row in rows]
