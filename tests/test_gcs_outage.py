"""A running job rides out a PostgreSQL crash (SIGKILL, then a restart on the same port)
with nothing lost or doubled; a GCS that stays down makes callers fail with a clear
error after a bounded, configurable time, and work goes on once it is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from log_rows import fetch_rows

import sdk as ray
from controlplane.embedded_postgres import EmbeddedPostgres
from controlplane.eventlog import EntityKind, Event, EventAppender, RecordedEvent
from controlplane.eventlog.servers import open_tailer
from controlplane.gcs import Gcs
from sdk.exceptions import RaySystemError

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def server() -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres()
    try:
        pg.start()
        yield pg
    finally:
        ray.shutdown()
        pg.stop()


@ray.remote
def square(x: int) -> int:
    return x * x


@ray.remote
class Tally:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def add(self, n: int) -> int:
        self.seen.append(n)
        return len(self.seen)

    def all(self) -> list[int]:
        return self.seen


def test_a_job_survives_sigkill_of_postgres_with_every_event_once(
    server: EmbeddedPostgres,
) -> None:
    ray.init(num_cpus=2, gcs_url=server.url)
    tally = Tally.remote()
    assert ray.get(tally.add.remote(-1)) == 1  # the actor is up before the crash
    refs = [square.remote(i) for i in range(5000)]
    calls = [tally.add.remote(i) for i in range(200)]
    deadline = time.monotonic() + 60
    while len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    done_before = len(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
    assert done_before < len(refs)  # the crash lands mid-job
    server.kill()
    time.sleep(1.0)  # down for a while: appends are held and retried
    server.start()
    assert ray.get(refs, timeout=180) == [i * i for i in range(5000)]
    assert ray.get(calls, timeout=60) == list(range(2, 202))
    assert ray.get(tally.all.remote(), timeout=60) == [-1, *range(200)]  # kept running

    ids = [ref.task_id().hex() for ref in refs]
    rows = asyncio.run(
        fetch_rows(
            server.url,
            "SELECT entity_id, array_agg(event_type ORDER BY position) AS history "
            "FROM events WHERE entity_kind = 'task' GROUP BY entity_id",
        )
    )
    history = {row["entity_id"]: row["history"] for row in rows}
    for task_id in ids:  # every task's full history, each transition once
        assert history[task_id] == ["submitted", "running", "finished"], task_id
    for call in calls:
        assert history[call.task_id().hex()] == ["submitted", "running", "finished"]


def test_a_gcs_that_stays_down_fails_callers_clearly_within_the_bound(
    server: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAIRN_GCS_UNAVAILABLE_TIMEOUT_S", "2")
    ray.init(num_cpus=2, gcs_url=server.url)
    assert ray.get(square.remote(3)) == 9
    server.kill()
    started = time.monotonic()
    with pytest.raises(
        RaySystemError,
        match=r"GCS at postgresql://cairn:\*\*\*@.* (stayed unreachable|is still down)",
    ):
        ray.get([square.remote(i) for i in range(50)], timeout=60)
    waited = time.monotonic() - started
    assert waited < 15, f"callers waited {waited:.1f}s for a 2 s bound"
    with pytest.raises(RaySystemError, match="still down"):  # fast while it stays down
        ray.get(square.remote(4), timeout=10)
    server.start()
    deadline = time.monotonic() + 60
    while True:  # and once it is back, work goes on
        try:
            assert ray.get(square.remote(5), timeout=30) == 25
            break
        except RaySystemError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_a_log_reader_opened_while_postgres_restarts_starts_once_it_is_back(
    server: EmbeddedPostgres,
) -> None:
    """A node daemon made anew while its PostgreSQL restarts opens its log reader then:
    the reader waits for the server, as its reads do, instead of failing at once (which
    stopped the new daemon, and had the cluster declare its node dead once more)."""
    with Gcs(server.url) as gcs:  # (migrated)
        url = gcs.url
    server.kill()

    async def first_read() -> list[RecordedEvent]:
        async with await open_tailer(url, reader=None, poll_interval=0.5) as tailer:
            return await tailer.read(wait=30)

    async def scenario() -> list[RecordedEvent]:
        opening = asyncio.create_task(first_read())
        await asyncio.sleep(1.5)  # down for a while: the reader is still opening
        assert not opening.done(), opening.exception()
        await asyncio.to_thread(server.start)
        event = Event(EntityKind.TASK, "after-the-restart", "submitted", {"name": "f"}, job_id="j")
        async with EventAppender(url) as appender:
            await appender.append(event)
        return await asyncio.wait_for(opening, 60)

    read = asyncio.run(scenario())
    assert [e.entity_id for e in read] == ["after-the-restart"]
