"""Placement groups on one node: bundles reserved together, tasks and actors that run
in them and only within what they reserve, removal, and their life in the log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import pytest

import sdk as ray
from sdk.exceptions import TaskUnschedulableError
from sdk.util import (
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from sdk.util.scheduling_strategies import PlacementGroupSchedulingStrategy as InGroup

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    ray.init(num_cpus=4, resources={"disk": 2})
    try:
        yield
    finally:
        ray.shutdown()


@ray.remote(num_cpus=1)
def span() -> tuple[float, float]:
    start = time.monotonic()
    time.sleep(0.3)
    return start, time.monotonic()


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


async def _group_events(pg_id: str) -> list[str]:
    conn = await asyncpg.connect(ray.get_runtime_context().gcs_address)
    try:
        rows = await conn.fetch(
            "SELECT event_type FROM events WHERE entity_kind = 'placement_group' "
            "AND entity_id = $1 ORDER BY position",
            pg_id,
        )
    finally:
        await conn.close()
    return [r["event_type"] for r in rows]


def test_a_group_reserves_its_bundles_and_its_tasks_stay_within_them() -> None:
    pg = placement_group([{"CPU": 1}, {"CPU": 1, "disk": 1}], strategy="PACK", name="pair")
    assert ray.get(pg.ready(), timeout=30) is True and pg.wait(5)
    entry = placement_group_table(pg)
    assert entry["state"] == "CREATED" and entry["strategy"] == "PACK"
    assert entry["bundles"] == {0: {"CPU": 1.0}, 1: {"CPU": 1.0, "disk": 1.0}}
    assert pg.id.hex() in placement_group_table()
    assert get_placement_group("pair").id == pg.id
    assert ray.available_resources()["CPU"] == 2.0  # the group holds the other two

    spans = ray.get([span.options(scheduling_strategy=InGroup(pg)).remote() for _ in range(6)])
    assert _most_at_once(spans) == 2  # the group's 2 CPUs, though the node has 2 more free

    @ray.remote(num_cpus=1, resources={"disk": 1})
    def needs_disk() -> str:
        return "ran"

    assert ray.get(needs_disk.options(scheduling_strategy=InGroup(pg, 1)).remote()) == "ran"
    with pytest.raises(TaskUnschedulableError, match="more than bundle"):
        ray.get(needs_disk.options(scheduling_strategy=InGroup(pg, 0)).remote(), timeout=30)

    remove_placement_group(pg)
    deadline = time.monotonic() + 10
    while ray.available_resources()["CPU"] != 4.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ray.available_resources()["CPU"] == 4.0  # given back
    with pytest.raises(TaskUnschedulableError, match="removed"):
        ray.get(span.options(scheduling_strategy=InGroup(pg)).remote(), timeout=30)
    with pytest.raises(ValueError, match="pair"):
        get_placement_group("pair")
    assert asyncio.run(_group_events(pg.id.hex())) == ["created", "ready", "removed"]


def test_groups_that_cannot_be_placed_are_never_ready() -> None:
    spread = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    too_big = placement_group([{"CPU": 8}])
    assert not spread.wait(1) and not too_big.wait(1)
    assert placement_group_table(spread)["state"] == "PENDING"
    assert asyncio.run(_group_events(too_big.id.hex())) == ["created", "infeasible"]
    remove_placement_group(spread)
    remove_placement_group(too_big)
    with pytest.raises(ray.exceptions.RaySystemError, match="before ready"):
        ray.get(spread.ready(), timeout=10)


def test_a_group_waits_for_resources_then_is_ready() -> None:
    hog = placement_group([{"CPU": 3}])
    assert hog.wait(10)
    second = placement_group([{"CPU": 2}])
    assert not second.wait(0.5)  # only 1 CPU is left
    remove_placement_group(hog)
    assert second.wait(10)
    remove_placement_group(second)


def test_actors_and_captured_child_tasks_run_in_the_group() -> None:
    pg = placement_group([{"CPU": 2}])
    assert pg.wait(10)

    @ray.remote(num_cpus=1)
    class Worker:
        def ping(self) -> str:
            return "pong"

    actor = Worker.options(scheduling_strategy=InGroup(pg, 0)).remote()
    assert ray.get(actor.ping.remote(), timeout=30) == "pong"
    assert ray.available_resources()["CPU"] == 2.0  # the actor's CPU is the group's

    @ray.remote(num_cpus=1)
    def child() -> float:
        return time.monotonic()

    @ray.remote(num_cpus=0)
    def parent() -> list[float]:
        return ray.get([child.remote() for _ in range(3)])

    captured = InGroup(pg, placement_group_capture_child_tasks=True)
    assert len(ray.get(parent.options(scheduling_strategy=captured).remote(), timeout=60)) == 3
    table = asyncio.run(_task_strategies(pg.id.hex()))
    assert table >= 3  # the children were submitted into the group
    ray.kill(actor)
    remove_placement_group(pg)


async def _task_strategies(pg_id: str) -> int:
    """How many tasks ran on the group's resources, from the log (children inherit the
    group, so their submitted events name the same resources as any task; count them
    by the spec stored with each submission)."""
    from dataplane import protocol as p

    conn = await asyncpg.connect(ray.get_runtime_context().gcs_address)
    try:
        rows = await conn.fetch(
            "SELECT data FROM events WHERE event_type = 'submitted' "
            "AND payload->>'name' LIKE '%child'"
        )
    finally:
        await conn.close()
    count = 0
    for row in rows:
        decoded = p.decode_frame(row["data"])
        spec = decoded[0] if isinstance(decoded, tuple) else decoded
        if spec.strategy and spec.strategy[1] == pg_id:
            count += 1
    return count


def test_bad_groups_are_refused_at_the_call() -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        placement_group([])
    with pytest.raises(ValueError, match="invalid amount"):
        placement_group([{"CPU": -1}])
    with pytest.raises(ValueError, match="strategy must be one of"):
        placement_group([{"CPU": 1}], strategy="SCATTER")
    pg = placement_group([{"CPU": 1}])
    with pytest.raises(ValueError, match="bundle_index"):
        InGroup(pg, 5)
    remove_placement_group(pg)
