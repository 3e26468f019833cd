"""Ray's ``memory`` resource (issue 18): every node offers it (``init(_memory=...)``,
``cairn start --memory``; by default what the machine has available less the object
store), tasks and actors that ask for it hold it while they run, and one asking more
than any node has waits as infeasible, as in Ray, until cancelled."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from log_rows import wait_for_rows
from ray_session import private_cluster

import sdk as ray
from controlplane.local_node import node_config
from sdk.exceptions import TaskCancelledError

pytestmark = pytest.mark.timeout(120)
GiB = 1024**3


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    yield from private_cluster(num_cpus=2, _memory=4 * GiB)


@ray.remote(memory=3 * GiB)
def big() -> float:
    return ray.available_resources().get("memory", 0.0)


def test_the_node_offers_memory_and_a_task_holds_what_it_asks() -> None:
    assert ray.cluster_resources()["memory"] == 4 * GiB
    assert ray.get(big.remote(), timeout=30) == 1 * GiB  # 3 of the 4 GiB held meanwhile
    assert ray.get(big.options(memory=GiB).remote(), timeout=30) == 3 * GiB


def test_a_task_asking_more_memory_than_any_node_has_waits_as_infeasible() -> None:
    ref = big.options(memory=8 * GiB).remote()
    wait_for_rows(
        ray.get_runtime_context().gcs_address,
        "SELECT 1 FROM events WHERE entity_id = $1 AND event_type = 'infeasible'",
        ref.task_id().hex(),
    )
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)


def test_memory_is_given_as_memory_not_as_a_custom_resource() -> None:
    with pytest.raises(ValueError, match="memory"):
        node_config(1, 0, {"memory": 1.0}, None)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    by_default = node_config(1, 0, None, GiB).resources["memory"]
    assert 0 < by_default <= total - GiB  # what is available, less the store
    assert node_config(1, 0, None, GiB, 3 * GiB).resources["memory"] == 3 * GiB
