"""``ray.nodes()``, ``cluster_resources()`` and ``available_resources()`` describe every
node of the cluster (read from the log through the driver's node daemon), in Ray's
shape: a private cluster's one node, then a real head and a joined node with other
resources, a task holding CPUs on the joined node, and that node killed and declared
dead."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from machine_cluster import machine_cluster

import sdk as ray
from controlplane import local_node

pytestmark = pytest.mark.timeout(180)

RAY_NODE_KEYS = {
    "NodeID",
    "Alive",
    "NodeManagerAddress",
    "NodeManagerHostname",
    "NodeManagerPort",
    "ObjectManagerPort",
    "ObjectStoreSocketName",
    "RayletSocketName",
    "MetricsExportPort",
    "NodeName",
    "DeathReason",
    "DeathReasonMessage",
    "alive",
    "Resources",
    "Labels",
}


def _until(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Polls ``condition`` until it returns something true; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def _without_store(resources: dict[str, float]) -> dict[str, float]:
    """Resources less object_store_memory and memory (their sizes depend on the
    machine)."""
    return {k: v for k, v in resources.items() if k not in ("object_store_memory", "memory")}


def test_a_private_cluster_is_its_one_node() -> None:
    ray.init(num_cpus=2, resources={"gadget": 1})
    try:
        started = time.monotonic()
        (node,) = ray.nodes()
        assert time.monotonic() - started < 0.5  # answered by the daemon, no query
        assert set(node) == RAY_NODE_KEYS
        assert node["NodeID"] == ray.get_runtime_context().get_node_id()
        assert node["Alive"] is True and node["alive"] is True and node["DeathReason"] == 0
        assert node["NodeManagerAddress"] == "127.0.0.1" and node["NodeName"] == "127.0.0.1"
        assert node["NodeManagerHostname"] == os.uname().nodename
        assert node["RayletSocketName"].endswith("node.sock")
        assert node["Labels"] == {"ray.io/node-id": node["NodeID"]}
        assert _without_store(node["Resources"]) == {
            "CPU": 2.0,
            "gadget": 1.0,
            "node:127.0.0.1": 1.0,
            "node:__internal_head__": 1.0,
        }
        assert node["Resources"]["object_store_memory"] > 0
        assert ray.cluster_resources() == node["Resources"]

        # node:<ip> and node:__internal_head__ are resources a task can ask for
        @ray.remote(resources={"node:127.0.0.1": 0.5, "node:__internal_head__": 0.01})
        def here() -> str:
            return ray.get_runtime_context().get_node_id()

        assert ray.get(here.remote(), timeout=60) == node["NodeID"]
        _until(lambda: ray.available_resources() == ray.cluster_resources(), "all free again")
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[local_node.NodeRecord, local_node.NodeRecord]]:
    """A head with 1 CPU and a joined node with 2 CPUs and 3 "gadget"; this process is a
    driver connected to the head."""
    gadgets = ["--num-cpus", "2", "--resources", '{"gadget": 3}']
    with machine_cluster(["--num-cpus", "1"], gadgets) as cluster:
        ray.init(address="auto")
        try:
            yield cluster.head, cluster.joined[0]
        finally:
            ray.shutdown()


def _node_id(record: local_node.NodeRecord) -> str:
    return (record.session_dir / "node.ready").read_text()


def _port(record: local_node.NodeRecord) -> int:
    assert record.address is not None
    return int(record.address.rpartition(":")[2])


def _by_id() -> dict[str, dict[str, Any]]:
    return {node["NodeID"]: node for node in ray.nodes()}


def _free(*names: str) -> tuple[float | None, ...]:
    free = ray.available_resources()
    return tuple(free.get(name) for name in names)


@ray.remote(num_cpus=2, resources={"gadget": 1})
def hold_until(release: str) -> str:
    """Holds 2 CPUs and a gadget (only the joined node has them) until ``release`` exists."""
    while not os.path.exists(release):
        time.sleep(0.02)
    return ray.get_runtime_context().get_node_id()


def test_every_node_with_its_resources_and_a_dead_one(
    cluster: tuple[local_node.NodeRecord, local_node.NodeRecord], tmp_path: Path
) -> None:
    head, joined = cluster
    head_id, joined_id = _node_id(head), _node_id(joined)
    _until(lambda: _by_id().keys() == {head_id, joined_id}, "both nodes in nodes()")
    listed = _by_id()
    for record, node in ((head, listed[head_id]), (joined, listed[joined_id])):
        assert set(node) == RAY_NODE_KEYS
        assert node["Alive"] is True and node["alive"] is True and node["DeathReason"] == 0
        assert node["NodeManagerAddress"] == "127.0.0.1"
        assert node["NodeManagerPort"] == node["ObjectManagerPort"] == _port(record)
        assert node["NodeManagerHostname"] == os.uname().nodename
        assert node["RayletSocketName"] == str(record.session_dir / "node.sock")
        assert node["Resources"]["object_store_memory"] > 0
    assert _without_store(listed[head_id]["Resources"]) == {
        "CPU": 1.0,
        "node:127.0.0.1": 1.0,
        "node:__internal_head__": 1.0,
    }
    assert _without_store(listed[joined_id]["Resources"]) == {
        "CPU": 2.0,
        "gadget": 3.0,
        "node:127.0.0.1": 1.0,
    }
    store = sum(n["Resources"]["object_store_memory"] for n in listed.values())
    memory = sum(n["Resources"]["memory"] for n in listed.values())
    totals = ray.cluster_resources()
    assert totals == {
        "CPU": 3.0,
        "gadget": 3.0,
        "node:127.0.0.1": 2.0,
        "node:__internal_head__": 1.0,
        "object_store_memory": store,
        "memory": memory,
    }
    _until(lambda: ray.available_resources() == totals, "everything free")

    # a task holding the joined node's 2 CPUs and a gadget: the head's CPU is what is left
    release = tmp_path / "release"
    ref = hold_until.remote(str(release))
    _until(
        lambda: _free("CPU", "gadget") == (1.0, 2.0),
        "the task's CPUs and gadget taken on the joined node",
    )
    assert _free("node:127.0.0.1") == (2.0,) and ray.cluster_resources() == totals
    release.touch()
    assert ray.get(ref, timeout=60) == joined_id
    _until(lambda: ray.available_resources() == totals, "the task's resources given back")

    # the joined node killed (all its processes at once): declared dead, listed as such,
    # and no longer counted
    os.killpg(os.getpgid(joined.pid), signal.SIGKILL)
    _until(lambda: not _by_id()[joined_id]["Alive"], "the killed node declared dead")
    dead = _by_id()[joined_id]
    assert dead["alive"] is False and dead["Resources"] == {}  # as Ray: a dead node's are gone
    assert dead["DeathReason"] == 2 and "missed heartbeats" in dead["DeathReasonMessage"]
    assert dead["NodeManagerAddress"] == "127.0.0.1" and dead["NodeManagerPort"] == _port(joined)
    assert {n["NodeID"]: n["Alive"] for n in ray.nodes()} == {head_id: True, joined_id: False}
    assert _without_store(ray.cluster_resources()) == {
        "CPU": 1.0,
        "node:127.0.0.1": 1.0,
        "node:__internal_head__": 1.0,
    }
    assert "gadget" not in ray.available_resources()
