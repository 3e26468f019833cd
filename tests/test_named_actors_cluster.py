"""A named actor's name is the cluster's, as in Ray: a task on another node than the
actor's owner finds it (``get_actor``, ``get_if_exists``, ``list_named_actors``) and
cannot take its name while it lives; once it is dead the name is free on every node,
and an actor named on the other node is found from the first. Real head and joined
node daemons on one machine, the names looked up in the log (PostgreSQL)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from machine_cluster import machine_cluster

import sdk as ray
from sdk.util import list_named_actors

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A head with 1 CPU and a joined node with the only "gadget"; this process is a
    driver connected to the head, in namespace "ns"."""
    with machine_cluster(["--num-cpus", "1"], ["--num-cpus", "2", "--resources", '{"gadget": 2}']):
        ray.init(address="auto", namespace="ns")
        try:
            yield
        finally:
            ray.shutdown()


@ray.remote(num_cpus=0)
class Counter:
    def __init__(self) -> None:
        self.count = 0


@ray.remote(resources={"gadget": 1}, num_cpus=0)
def on_the_joined_node(name: str) -> dict[str, Any]:
    """What a task on the joined node sees of the name ``name``."""
    seen: dict[str, Any] = {"node": ray.get_runtime_context().get_node_id()}
    try:
        seen["found"] = ray.get_actor(name)._actor_id
    except ValueError as exc:
        seen["found"] = f"ValueError: {exc}"
    try:
        ray.get_actor(name, namespace="elsewhere")
        seen["elsewhere"] = "found"
    except ValueError:
        seen["elsewhere"] = "missing"
    try:
        Counter.options(name=name).remote()
        seen["taken"] = "made another"
    except ValueError as exc:
        seen["taken"] = f"ValueError: {exc}"
    seen["if_exists"] = Counter.options(name=name, get_if_exists=True).remote()._actor_id
    seen["listed"] = list_named_actors()
    seen["listed_all"] = list_named_actors(all_namespaces=True)
    return seen


@ray.remote(resources={"gadget": 1}, num_cpus=0)
def lookup_there(name: str) -> str:
    try:
        return ray.get_actor(name)._actor_id
    except ValueError as exc:
        return f"ValueError: {exc}"


@ray.remote(resources={"gadget": 1}, num_cpus=0)
def name_one_there(name: str) -> str:
    return Counter.options(name=name, lifetime="detached").remote()._actor_id


def _until(condition: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def test_a_name_is_the_clusters(cluster: None) -> None:
    here = ray.get_runtime_context().get_node_id()
    coord = Counter.options(name="coord").remote()
    seen = ray.get(on_the_joined_node.remote("coord"), timeout=60)
    assert seen["node"] != here
    assert seen["found"] == coord._actor_id
    assert seen["elsewhere"] == "missing"
    assert seen["taken"].startswith("ValueError: ") and "already taken" in seen["taken"]
    assert seen["if_exists"] == coord._actor_id
    assert "coord" in seen["listed"]
    assert {"name": "coord", "namespace": "ns"} in seen["listed_all"]

    # dead: its name is free everywhere (the owner's `dead` event is written behind)
    ray.kill(coord)
    _until(
        lambda: ray.get(lookup_there.remote("coord"), timeout=60).startswith("ValueError"),
        "the dead actor's name to be free on the joined node",
    )
    again = ray.get(name_one_there.remote("coord"), timeout=60)
    assert again != coord._actor_id
    # and the actor named through the joined node is the head's driver's to find
    assert ray.get_actor("coord")._actor_id == again
    with pytest.raises(ValueError, match="already taken"):
        Counter.options(name="coord").remote()
    ray.kill(ray.get_actor("coord"))
