"""Streaming generators on another node than their caller's (issue 18), on a real
two-node cluster on this machine (a head with 1 CPU, a node with an "other" resource):
a generator placed there by the global scheduler (its resources, or a node affinity)
streams its values to the driver on the head as they are yielded, small ones in their
``created`` events, large ones pulled when wanted; its error comes at the failing
yield. Real node daemons, workers and PostgreSQL."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from log_rows import wait_for_rows
from machine_cluster import machine_cluster, node_id

import sdk as ray
from sdk.exceptions import RayTaskError
from sdk.util.scheduling_strategies import NodeAffinitySchedulingStrategy

pytestmark = pytest.mark.timeout(240)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    other = ["--num-cpus", "1", "--resources", '{"other": 1}']
    with machine_cluster(["--num-cpus", "1"], other) as cluster:
        ray.init(address="auto")
        try:
            yield {
                "head": node_id(cluster.head),
                "other": node_id(cluster.joined[0]),
                "url": ray.get_runtime_context().gcs_address,
            }
        finally:
            ray.shutdown()


@ray.remote(num_returns="streaming", resources={"other": 1})
def values_from_elsewhere(sizes: list[int]) -> Iterator[tuple[str, bytes]]:
    for i, size in enumerate(sizes):
        yield ray.get_runtime_context().get_node_id(), bytes([i]) * size


@ray.remote(num_returns="streaming", resources={"other": 1})
def slowly(release: str) -> Iterator[str]:
    yield "first"
    while not Path(release).exists():
        time.sleep(0.02)
    yield "second"


@ray.remote(num_returns="streaming", resources={"other": 1})
def fails_at(k: int) -> Iterator[int]:
    yield from range(k)
    raise ValueError(f"no value {k}")


def test_a_generator_placed_on_another_node_streams_to_its_caller(
    cluster: dict[str, str],
) -> None:
    sizes = [10, 2_000_000, 20, 3_000_000]  # inline in the log, and left on that node
    gen = values_from_elsewhere.remote(sizes)
    got = [ray.get(ref, timeout=60) for ref in gen]
    assert [node for node, _ in got] == [cluster["other"]] * 4
    assert [value for _, value in got] == [bytes([i]) * size for i, size in enumerate(sizes)]
    rows = wait_for_rows(
        cluster["url"],
        "SELECT entity_id, node_id FROM events WHERE event_type = 'created' "
        "AND payload->>'task_id' = $1 ORDER BY position",
        gen.task_id(),
        count=4,
    )
    assert {row["node_id"] for row in rows} == {cluster["other"]}


def test_each_value_reaches_the_caller_as_it_is_yielded(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    release = tmp_path / "release"
    gen = slowly.remote(str(release))
    assert ray.get(next(gen), timeout=60) == "first"  # while the generator still waits
    release.write_text("go")
    assert ray.get(next(gen), timeout=60) == "second"
    assert list(gen) == []


def test_the_error_comes_at_the_failing_yield(cluster: dict[str, str]) -> None:
    refs = list(fails_at.remote(2))
    assert len(refs) == 3
    assert ray.get(refs[:2], timeout=60) == [0, 1]
    with pytest.raises(RayTaskError, match="no value 2"):
        ray.get(refs[2], timeout=60)


def test_a_hard_node_affinity_places_a_generator_there(cluster: dict[str, str]) -> None:
    strategy = NodeAffinitySchedulingStrategy(cluster["other"], soft=False)
    gen = values_from_elsewhere.options(resources={}, scheduling_strategy=strategy).remote([5, 6])
    assert [node for node, _ in (ray.get(ref, timeout=60) for ref in gen)] == [cluster["other"]] * 2


@ray.remote(resources={"other": 1})
class FarAway:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(num_returns="streaming")
    def count(self, n: int) -> Iterator[tuple[int, str]]:
        for i in range(n):
            yield i, ray.get_runtime_context().get_node_id()


def test_a_streaming_method_of_an_actor_on_another_node_streams_to_its_caller(
    cluster: dict[str, str],
) -> None:
    actor = FarAway.remote()
    there = ray.get(actor.node.remote(), timeout=60)
    assert there != ray.get_runtime_context().get_node_id()
    values = [ray.get(ref, timeout=60) for ref in actor.count.remote(4)]
    assert values == [(i, there) for i in range(4)]
    ray.kill(actor)
