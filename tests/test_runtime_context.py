"""``get_runtime_context()`` with Ray's methods (issue 18), as Ray's documentation
shows them, in a driver, a task, a sync and an async actor, a named actor and one
restarted after its process died. Real node daemon, workers and PostgreSQL."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest
from ray_session import private_cluster

import sdk as ray
from sdk.util.placement_group import placement_group, remove_placement_group
from sdk.util.scheduling_strategies import PlacementGroupSchedulingStrategy

pytestmark = pytest.mark.timeout(120)
# its plain helpers (functions, classes) travel by value: workers cannot import tests/
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    yield from private_cluster(num_cpus=2, resources={"gadget": 2})


def _describe() -> dict[str, Any]:
    ctx = ray.get_runtime_context()
    return {
        "task_id": ctx.get_task_id(),
        "task_name": ctx.get_task_name(),
        "function_name": ctx.get_task_function_name(),
        "actor_id": ctx.get_actor_id(),
        "actor_name": ctx.get_actor_name(),
        "resources": ctx.get_assigned_resources(),
        "worker_id": ctx.get_worker_id(),
        "pg": ctx.get_placement_group_id(),
        "job_id": ctx.get_job_id(),
        "node_id": ctx.get_node_id(),
        "pid": os.getpid(),
    }


@ray.remote(resources={"gadget": 1})
def get_task_name() -> dict[str, Any]:
    return _describe()


@ray.remote
class Actor:
    def describe(self) -> dict[str, Any]:
        found = _describe()
        ctx = ray.get_runtime_context()
        found["reconstructed"] = ctx.was_current_actor_reconstructed
        return found

    def myself(self) -> str:
        return ray.get_runtime_context().current_actor._actor_id


@ray.remote
class AsyncActor:
    async def describe(self) -> dict[str, Any]:
        return _describe()


def test_the_driver() -> None:
    ctx = ray.get_runtime_context()
    assert ctx.get_task_id() is None and ctx.get_actor_id() is None
    assert ctx.get_actor_name() is None and ctx.get_assigned_resources() == {}
    assert isinstance(ctx.get_worker_id(), str) and ctx.get_worker_id()
    assert ctx.get()["job_id"] == ray.JobID.from_hex(ctx.get_job_id())
    with pytest.warns(DeprecationWarning, match=r"Use get_job_id\(\) instead"):
        assert ctx.job_id.hex() == ctx.get_job_id() and ctx.job_id.binary()
    assert ctx.get_dashboard_url() == ""  # (a private cluster serves none)
    assert "task_id" not in ctx.get()
    with pytest.raises(RuntimeError):
        ctx.current_actor  # noqa: B018


def test_a_task_knows_its_names_resources_and_ids() -> None:
    ref = get_task_name.remote()
    found = ray.get(ref)
    assert found["task_id"] == ref.task_id().hex()
    assert found["task_name"] == "get_task_name"  # Ray's default: the function's name
    assert found["function_name"] == f"{__name__}.get_task_name"
    assert found["actor_id"] is None and found["actor_name"] is None
    assert found["resources"] == {"CPU": 1.0, "gadget": 1.0}
    assert found["job_id"] == ray.get_runtime_context().get_job_id()
    assert found["worker_id"] != ray.get_runtime_context().get_worker_id()
    named = ray.get(get_task_name.options(name="task_name").remote())
    assert named["task_name"] == "task_name"


def test_actors_know_their_calls_and_themselves() -> None:
    actor = Actor.options(name="karl").remote()
    found = ray.get(actor.describe.remote())
    assert found["task_name"] == "Actor.describe"
    assert found["function_name"] == f"{__name__}.Actor.describe"
    assert found["actor_id"] == actor._actor_id and found["actor_name"] == "karl"
    assert found["reconstructed"] is False
    assert ray.get(actor.myself.remote()) == actor._actor_id  # current_actor
    anonymous = ray.get(AsyncActor.remote().describe.remote())
    assert anonymous["actor_name"] == ""  # an actor without a name, as in Ray
    assert anonymous["function_name"] == f"{__name__}.AsyncActor.describe"


def test_nested_definitions_are_named_by_their_own_names_as_in_ray() -> None:
    """Ray's function descriptors use ``__name__``: a class or function defined inside
    another is not named by its qualified name ("outer.<locals>.Inner")."""

    @ray.remote
    class Inner:
        def describe(self) -> dict[str, Any]:
            return _describe()

    @ray.remote
    def inner() -> dict[str, Any]:
        return _describe()

    found = ray.get(Inner.remote().describe.remote())
    assert found["task_name"] == "Inner.describe"
    assert found["function_name"] == f"{__name__}.Inner.describe"
    found = ray.get(inner.remote())
    assert (found["task_name"], found["function_name"]) == ("inner", f"{__name__}.inner")

    @ray.remote
    class InnerAsync:
        async def describe(self) -> dict[str, Any]:
            return _describe()

    found = ray.get(InnerAsync.remote().describe.remote())
    assert found["task_name"] == "InnerAsync.describe"
    # Ray's quirk: an async method's is its qualified name
    qualified = "test_nested_definitions_are_named_by_their_own_names_as_in_ray.<locals>"
    assert found["function_name"] == f"{__name__}.{qualified}.InnerAsync.describe"


def test_a_restarted_actor_knows_it_was_reconstructed() -> None:
    actor = Actor.options(max_restarts=1, max_task_retries=1).remote()
    pid = ray.get(actor.describe.remote())["pid"]
    os.kill(pid, signal.SIGKILL)
    again = ray.get(actor.describe.remote(), timeout=60)
    assert again["pid"] != pid and again["reconstructed"] is True


@ray.remote
def anywhere() -> dict[str, Any]:
    return _describe()


def test_a_task_in_a_placement_group_knows_its_group() -> None:
    group = placement_group([{"CPU": 1}])
    try:
        ray.get(group.ready(), timeout=30)
        strategy = PlacementGroupSchedulingStrategy(group)
        found = ray.get(anywhere.options(scheduling_strategy=strategy).remote())
        assert found["pg"] == group.id.hex()
        assert ray.get(anywhere.remote())["pg"] is None
    finally:
        remove_placement_group(group)


@ray.remote
def current_group() -> str | None:
    from sdk.util import get_current_placement_group

    group = get_current_placement_group()
    return group.id.hex() if group is not None else None


def test_get_current_placement_group() -> None:
    from sdk.util import get_current_placement_group

    assert get_current_placement_group() is None  # a driver is in none
    group = placement_group([{"CPU": 1}])
    try:
        ray.get(group.ready(), timeout=30)
        strategy = PlacementGroupSchedulingStrategy(group)
        in_group = current_group.options(scheduling_strategy=strategy)
        assert ray.get(in_group.remote()) == group.id.hex()
        assert ray.get(current_group.remote()) is None
    finally:
        remove_placement_group(group)
