"""Reading the log in tests: one query's rows, from a fresh connection."""

from __future__ import annotations

import asyncio
import time

import asyncpg


async def fetch_rows(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def rows(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """``fetch_rows`` for code outside an event loop."""
    return asyncio.run(fetch_rows(url, sql, *args))


def wait_for_rows(
    url: str, sql: str, *args: object, count: int = 1, timeout: float = 30.0
) -> list[asyncpg.Record]:
    """The query's rows once there are at least ``count`` (events written behind commit
    a little after what they describe is visible); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while len(found := rows(url, sql, *args)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} rows after {timeout}s: {sql}"
        time.sleep(0.02)
    return found


def history(url: str, entity_id: str, count: int) -> list[str]:
    """An entity's event types in log order, once it has at least ``count`` events."""
    found = wait_for_rows(
        url,
        "SELECT event_type FROM events WHERE entity_id = $1 ORDER BY position",
        entity_id,
        count=count,
    )
    return [row["event_type"] for row in found]
