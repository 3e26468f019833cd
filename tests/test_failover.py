"""Failover to a streaming replica during a job: the primary is SIGKILLed, the replica
promoted, and the cluster -- given both in one multi-host URL -- carries on there.
Every event acknowledged before the primary died is on the new primary (the replica is
synchronous); the job completes; the pause clients saw is measured."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from log_rows import fetch_rows

import sdk as ray
from controlplane import schema
from controlplane.embedded_postgres import EmbeddedPostgres

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def servers() -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    primary = EmbeddedPostgres()
    replica = None
    try:
        schema.upgrade(primary.start())
        replica = primary.start_replica()
        yield primary, replica
    finally:
        ray.shutdown()
        if replica is not None:
            replica.stop()
        primary.stop()


@ray.remote
def square(x: int) -> int:
    return x * x


def test_failover_to_a_promoted_replica_loses_no_acknowledged_event(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres],
) -> None:
    primary, replica = servers
    password = primary.url.split("@")[0].rsplit(":", 1)[1]
    url = (
        f"postgresql://cairn:{password}@127.0.0.1:{primary.port},127.0.0.1:{replica.port}"
        "/cairn?target_session_attrs=read-write"
    )
    ray.init(num_cpus=2, gcs_url=url)
    refs = [square.remote(i) for i in range(3000)]
    deadline = time.monotonic() + 60
    while len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < 300:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # a result is visible only once its finished event is durable: these were acknowledged
    acknowledged = [r.task_id() for r in ray.wait(refs, num_returns=len(refs), timeout=0)[0]]
    assert len(acknowledged) < len(refs)  # the primary dies mid-job
    primary.kill()
    killed = time.monotonic()
    time.sleep(0.5)  # the time an operator (or a watchdog) takes to notice
    replica.promote()
    assert ray.get(refs, timeout=120) == [i * i for i in range(3000)]
    pause = time.monotonic() - killed
    print(f"failover: the job went on {pause:.2f}s after the primary died")

    rows = asyncio.run(
        fetch_rows(
            replica.url,
            "SELECT entity_id, array_agg(event_type ORDER BY position) AS history "
            "FROM events WHERE entity_kind = 'task' GROUP BY entity_id",
        )
    )
    history = {row["entity_id"]: row["history"] for row in rows}
    for task_id in acknowledged:  # acknowledged before the primary died: all there
        assert "finished" in history[task_id], task_id
    for ref in refs:  # and the whole job, each transition once
        assert history[ref.task_id()] == ["submitted", "scheduled", "running", "finished"]
