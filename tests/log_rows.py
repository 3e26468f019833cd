"""Reading the log in tests: one query's rows, from a fresh connection."""

from __future__ import annotations

import asyncio

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
