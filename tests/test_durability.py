"""Durability across a PostgreSQL crash: what an append acknowledged survives SIGKILL of
the server, and an appender rides out the restart without losing or doubling events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import pytest

from controlplane import schema
from controlplane.embedded_postgres import EmbeddedPostgres
from controlplane.errors import GcsUnavailableError
from controlplane.eventlog import EntityKind, Event, EventAppender, Tailer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server() -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres()
    try:
        schema.upgrade(pg.start())
        yield pg
    finally:
        pg.stop()


def event(n: int) -> Event:
    return Event(EntityKind.TASK, f"task-{n}", "submitted", {"name": "f", "n": n})


async def stored(url: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT position, entity_id FROM events ORDER BY position")
        return [(r["position"], r["entity_id"]) for r in rows]
    finally:
        await conn.close()


async def test_acknowledged_events_survive_sigkill_of_postgres(server: EmbeddedPostgres) -> None:
    url = server.url
    async with EventAppender(url) as appender:
        positions = await appender.append_many([event(n) for n in range(100)])
        positions.append(await appender.append(event(100)))
    server.kill()
    assert server.pid is None
    server.start()  # same port, same data directory: crash recovery replays the WAL
    assert await stored(url) == [(p, f"task-{n}") for n, p in enumerate(positions)]


def _failed_reconnects(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """The appenders' attempts to connect again that failed, as they happen."""
    from controlplane.eventlog import appender

    failed: list[BaseException] = []
    real = appender.connect

    async def counted(*args: object, **kwargs: object) -> asyncpg.Connection:
        try:
            return await real(*args, **kwargs)
        except GcsUnavailableError as exc:
            failed.append(exc)
            raise

    monkeypatch.setattr(appender, "connect", counted)
    return failed


async def test_appender_retries_across_a_restart_and_stores_each_event_once(
    server: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.url
    failed = _failed_reconnects(monkeypatch)
    async with EventAppender(url, unavailable_timeout=60) as appender:
        await appender.append_many([event(n) for n in range(10)])
        server.kill()
        pending = asyncio.create_task(appender.append_many([event(n) for n in range(10, 20)]))
        deadline = time.monotonic() + 30
        while len(failed) < 2:  # it tried to connect again, and again, in vain
            assert time.monotonic() < deadline and not pending.done(), failed
            await asyncio.sleep(0.01)
        assert not pending.done()  # buffered and being retried while the server is down
        await asyncio.to_thread(server.start)
        positions = await asyncio.wait_for(pending, 30)
        assert positions == list(range(11, 21))
    rows = await stored(url)
    assert [entity for _, entity in rows] == [f"task-{n}" for n in range(20)]
    async with Tailer(url) as tailer:
        got = []
        while len(got) < 20:
            got += await tailer.read(wait=5)
    assert [e.position for e in got] == list(range(1, 21))


async def test_appender_gives_up_after_the_unavailable_timeout(server: EmbeddedPostgres) -> None:
    async with EventAppender(server.url, unavailable_timeout=1.0) as appender:
        await appender.append(event(0))
        server.kill()
        with pytest.raises(GcsUnavailableError, match=r"stayed unreachable for 1\.0s") as caught:
            await asyncio.wait_for(appender.append(event(1)), 20)
        assert "***" in str(caught.value)
