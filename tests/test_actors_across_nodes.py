"""An actor is the cluster's, as in Ray: a task on another node than the actor's owner
finds it by name (``get_actor``, ``get_if_exists``, ``list_named_actors``), cannot take
its name while it lives, calls it (a handle passed or found by name: the calls run in
the order made, and the owner sees their effect) and kills it; once it is dead the
name is free on every node, the other node's calls fail with ActorDiedError, and an
actor named on the other node is found from the first. Real head and joined node
daemons on one machine; names and where an actor lives are read from the log."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from machine_cluster import MachineCluster, machine_cluster, node_id

import sdk as ray
from sdk.util import list_named_actors
from sdk.util.queue import Queue
from sdk.util.scheduling_strategies import NodeAffinitySchedulingStrategy

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", params=[1, 2], ids=["one log server", "two log servers"])
def cluster(request: pytest.FixtureRequest) -> Iterator[MachineCluster]:
    """A head with 1 CPU (its log on one embedded server, or two: the names and the
    actors' events of a job then lie on either), a joined node with the only "gadget"
    and one with the only "spot" (killed by the last test); this process is a driver
    connected to the head, in namespace "ns"."""
    with machine_cluster(
        ["--num-cpus", "1", "--log-servers", str(request.param)],
        ["--num-cpus", "2", "--resources", '{"gadget": 2}'],
        ["--num-cpus", "1", "--resources", '{"spot": 1}'],
    ) as nodes:
        ray.init(address="auto", namespace="ns")
        try:
            yield nodes
        finally:
            ray.shutdown()


@ray.remote(num_cpus=0)
class Counter:
    def __init__(self) -> None:
        self.count = 0

    def add(self, k: int) -> int:
        self.count += k
        return self.count

    def block(self, started: str) -> None:
        open(started, "w").close()
        time.sleep(600)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def block_once(self, started: str) -> str:
        """Blocks the first time (on one instance); answers when run again."""
        if os.path.exists(started):
            return "ran again"
        open(started, "w").close()
        time.sleep(600)
        return "not reached"


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


def test_a_name_is_the_clusters(cluster: MachineCluster) -> None:
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


@ray.remote(resources={"gadget": 1}, num_cpus=0)
def call_there(passed: Any, name: str) -> list[int]:
    """Calls the actor through a handle passed and one found by name (unless "unnamed"),
    from the joined node: 1 + 20 calls, each result returned in order."""
    first = ray.get(passed.add.remote(10))
    if name == "unnamed":
        return [first]
    found = ray.get_actor(name)
    return [first, *ray.get([found.add.remote(1) for _ in range(20)])]


@ray.remote(resources={"gadget": 1}, num_cpus=0)
def only_kill_there(passed: Any) -> None:
    ray.kill(passed)


@ray.remote(resources={"gadget": 1}, num_cpus=0)
def kill_there(passed: Any) -> str:
    ray.kill(passed)
    try:
        ray.get(passed.add.remote(1), timeout=30)
        return "answered"
    except ray.exceptions.ActorDiedError as exc:
        return f"ActorDiedError: {exc}"


def test_another_nodes_task_calls_and_kills_an_actor(cluster: MachineCluster) -> None:
    counter = Counter.options(name="shared").remote()
    assert ray.get(counter.add.remote(1)) == 1
    assert ray.get(call_there.remote(counter, "shared"), timeout=60) == list(range(11, 32))
    assert ray.get(counter.add.remote(0)) == 31  # the owner sees what they did

    said = ray.get(kill_there.remote(counter), timeout=60)
    assert said.startswith("ActorDiedError: ")
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(counter.add.remote(1), timeout=30)

    # killed from a node that never called it (which does not know where it lives)
    fresh = Counter.remote()
    assert ray.get(fresh.add.remote(1)) == 1
    ray.get(only_kill_there.remote(fresh), timeout=60)

    def dead() -> bool:
        try:
            ray.get(fresh.add.remote(0), timeout=30)
        except ray.exceptions.ActorDiedError:
            return True
        return False

    _until(dead, "the actor killed from the other node")


@ray.remote(resources={"gadget": 1}, num_cpus=0)
def produce_there(queue: Queue, count: int) -> str:
    for i in range(count):
        queue.put(i)
    return ray.get_runtime_context().get_node_id()


def test_a_queue_made_here_is_filled_from_the_other_node(cluster: MachineCluster) -> None:
    """ray.util.queue.Queue, an actor: a task on the other node puts, the driver gets."""
    queue = Queue(maxsize=5)  # (smaller than what is put: the producer waits for room)
    producer = produce_there.remote(queue, 12)
    assert [queue.get(timeout=30) for _ in range(12)] == list(range(12))
    assert ray.get(producer, timeout=30) != ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
class Keeper:
    """Keeps the refs it is given (inside a list: borrowed, not resolved)."""

    def __init__(self) -> None:
        self.kept: list[Any] = []

    def keep(self, refs: list[Any]) -> int:
        self.kept += refs
        return len(self.kept)

    def total(self) -> int:
        return sum(len(value) for value in ray.get(self.kept))


@ray.remote(resources={"gadget": 1}, num_cpus=0)
def give_there(keeper: Any) -> int:
    """Puts two objects on the joined node and hands their refs to the keeper; they are
    this task's, which ends once the keeper has them."""
    return ray.get(keeper.keep.remote([ray.put(b"a" * 100), ray.put(b"b" * 3_000_000)]))


def test_an_actor_keeps_refs_another_nodes_task_made(cluster: MachineCluster) -> None:
    keeper = Keeper.remote()
    assert ray.get(give_there.remote(keeper), timeout=60) == 2
    assert ray.get(keeper.total.remote(), timeout=60) == 3_000_100


@ray.remote(num_cpus=0)
def get_or_make(name: str, go: str, started: str) -> tuple[str, str]:
    """Says it started (a file in ``started``), waits for ``go``, then gets or makes the
    actor named ``name`` and adds 1."""
    open(os.path.join(started, uuid.uuid4().hex), "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    counter = Counter.options(name=name, get_if_exists=True).remote()
    ray.get(counter.add.remote(1))
    return ray.get_runtime_context().get_node_id(), counter._actor_id


def test_nodes_getting_or_making_one_name_at_once_get_one_actor(
    cluster: MachineCluster, tmp_path: Path
) -> None:
    """get_if_exists from both nodes at the same moment: the name is claimed in the
    log, so one actor is made and every caller gets it."""
    go = tmp_path / "go"
    here = get_or_make.options(resources={"node:__internal_head__": 0.01})
    there = get_or_make.options(resources={"gadget": 0.1})
    started = tmp_path / "started"
    started.mkdir()
    refs = [f.remote("lazy", str(go), str(started)) for _ in range(4) for f in (here, there)]
    _until(lambda: len(list(started.iterdir())) == 8, "every task started and waiting")
    go.touch()
    answers = ray.get(refs, timeout=60)
    assert len({node for node, _ in answers}) == 2
    assert len({actor for _, actor in answers}) == 1
    assert ray.get(ray.get_actor("lazy").add.remote(0)) == 8


def test_an_actor_whose_node_dies_fails_or_reruns_the_other_nodes_calls(
    cluster: MachineCluster, tmp_path: Path
) -> None:
    """Runs last: it kills the "spot" node, where two actors live (made by this driver,
    called from the "gadget" node, which learns the death from the log). The call
    running on the one with no restarts, and the call made after, fail with
    ActorDiedError; the call running on the one with a restart and a call retry runs
    again on its new instance, on another node."""
    spot = cluster.joined[1]
    dead = node_id(spot)
    counter = Counter.options(resources={"spot": 1}, max_restarts=0).remote()
    on_spot = NodeAffinitySchedulingStrategy(dead, soft=True)
    restarting = Counter.options(
        scheduling_strategy=on_spot, max_restarts=1, max_task_retries=1
    ).remote()
    assert ray.get(call_there.remote(counter, "unnamed"), timeout=60) == [10]  # (no name)
    assert ray.get(call_there.remote(restarting, "unnamed"), timeout=60) == [10]
    assert ray.get(where_is.remote(restarting), timeout=60) == dead
    started, again = tmp_path / "started", tmp_path / "again"
    in_flight = block_there.remote(counter, str(started))
    retried = block_once_there.remote(restarting, str(again))
    _until(lambda: started.exists() and again.exists(), "the other node's calls running")
    os.killpg(os.getpgid(spot.pid), signal.SIGKILL)
    said = ray.get(in_flight, timeout=60)
    assert said.startswith("ActorDiedError: ") and counter._actor_id in said
    assert ray.get(retried, timeout=120) == "ran again"
    assert ray.get(where_is.remote(restarting), timeout=60) != dead
    _until(
        lambda: any(n["NodeID"] == dead and not n["Alive"] for n in ray.nodes()),
        "the spot node declared dead",
    )
    said = ray.get(call_once_there.remote(counter), timeout=60)
    assert said.startswith("ActorDiedError: ") and counter._actor_id in said
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(counter.add.remote(1), timeout=30)


@ray.remote(resources={"gadget": 1}, num_cpus=0)
def block_once_there(passed: Any, started: str) -> str:
    return str(ray.get(passed.block_once.remote(started), timeout=110))


@ray.remote(num_cpus=0)
def where_is(actor: Any) -> str:
    return str(ray.get(actor.node.remote(), timeout=30))


@ray.remote(resources={"gadget": 1}, num_cpus=0)
def call_once_there(passed: Any) -> str:
    try:
        return str(ray.get(passed.add.remote(1), timeout=30))
    except ray.exceptions.ActorDiedError as exc:
        return f"ActorDiedError: {exc}"


@ray.remote(resources={"gadget": 1}, num_cpus=0)
def block_there(passed: Any, started: str) -> str:
    try:
        return str(ray.get(passed.block.remote(started), timeout=60))
    except ray.exceptions.ActorDiedError as exc:
        return f"ActorDiedError: {exc}"
