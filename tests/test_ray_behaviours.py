"""Smaller behaviours of Ray's public API that its own unit tests rely on (issue 21):
what ``init()`` returns, refs as asyncio futures and with completion callbacks, an
empty ``wait``, and a call's arguments checked against the signature at ``.remote()``.
Each against a real private cluster."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from processes import run_driver

import sdk as ray
from sdk.exceptions import ActorDiedError, RaySystemError, RayTaskError, WorkerCrashedError
from sdk.runtime_context import RayContext

# (this module's classes and exceptions are pickled by value: workers cannot import it)
cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayContext]:
    context = ray.init(num_cpus=1)
    try:
        yield context
    finally:
        ray.shutdown()


@ray.remote
def add(a: int, b: int = 1) -> int:
    return a + b


@ray.remote
def boom() -> None:
    raise ValueError("boom")


@ray.remote
class Pair:
    def __init__(self, left: int, right: int) -> None:
        self.both = (left, right)

    def get(self) -> tuple[int, int]:
        return self.both


def test_init_returns_rays_context(cluster: RayContext) -> None:
    context = cluster
    node_id = ray.get_runtime_context().get_node_id()
    assert context["node_id"] == context.address_info["node_id"] == node_id
    assert context.get("session_dir") and "gcs_address" in context
    assert "cairn_runtime:***@" in context["gcs_address"]  # (no password shown)
    assert context.dashboard_url == "" and context.python_version.count(".") == 2
    assert context.get_job_id() == ray.get_runtime_context().get_job_id()  # (passed on)
    with pytest.raises(RuntimeError, match="ignore_reinit_error"):
        ray.init()
    assert ray.init(ignore_reinit_error=True)["node_id"] == node_id


def test_init_as_a_context_manager_shuts_down_at_its_end(cluster: RayContext) -> None:
    ray.shutdown()  # (the module's cluster: made again below for the tests after)
    with ray.init(num_cpus=1) as context:
        assert ray.is_initialized() and ray.get(add.remote(1)) == 2
        assert context["node_id"] == ray.get_runtime_context().get_node_id()
    assert not ray.is_initialized()
    ray.init(num_cpus=1)


def test_an_empty_wait_returns_two_empty_lists(cluster: RayContext) -> None:
    assert ray.wait([]) == ([], [])
    assert ray.wait([], num_returns=0, timeout=0) == ([], [])


def test_a_ref_as_an_asyncio_future_and_with_a_completion_callback(
    cluster: RayContext,
) -> None:
    async def awaited() -> int:
        future = add.remote(2, 3).as_future()
        assert isinstance(future, asyncio.Future)
        return await future

    assert asyncio.run(awaited()) == 5

    results: list[object] = []
    called = threading.Event()

    def callback(result: object) -> None:
        results.append(result)
        called.set()

    add.remote(40, 2)._on_completed(callback)
    assert called.wait(30) and results == [42]
    called.clear()
    boom.remote()._on_completed(callback)  # a failed task: its exception, as Ray's
    assert called.wait(30) and isinstance(results[1], RayTaskError)
    assert "boom" in str(results[1])


def test_arguments_are_checked_against_the_signature_at_remote(
    cluster: RayContext,
) -> None:
    with pytest.raises(TypeError, match=r"add\.remote\(\): missing a required argument: 'a'"):
        add.remote()
    with pytest.raises(TypeError, match="unexpected keyword argument 'c'"):
        add.remote(1, c=2)
    with pytest.raises(TypeError, match="too many positional arguments"):
        add.options(num_cpus=0.5).remote(1, 2, 3)  # (options keep the check)
    with pytest.raises(TypeError, match=r"Pair\.remote\(\): missing a required argument"):
        Pair.remote(1)
    assert ray.get(add.remote(1, b=5)) == 6  # the right calls still run
    assert ray.get(Pair.remote(1, right=2).get.remote()) == (1, 2)


def test_the_queues_async_put_and_get_and_shutdown(cluster: RayContext) -> None:
    from sdk.util.queue import Empty, Full, Queue

    queue = Queue(maxsize=2)

    async def use() -> list[int]:
        await queue.put_async(1)
        await queue.put_async(2)
        with pytest.raises(Full):
            await queue.put_async(3, block=False)
        with pytest.raises(Full):
            await queue.put_async(3, timeout=0.1)
        got = [await queue.get_async(), await queue.get_async(timeout=1)]
        with pytest.raises(Empty):
            await queue.get_async(block=False)
        with pytest.raises(Empty):
            await queue.get_async(timeout=0.1)
        return got

    assert asyncio.run(use()) == [1, 2]
    queue.put_nowait_batch([5, 6])
    assert queue.full() and not queue.empty()
    assert queue.get_nowait_batch(2) == [5, 6]
    queue.shutdown()
    assert queue.actor is None


@ray.remote
class Doubler:
    def __init__(self) -> None:
        self.calls = 0

    def double(self, value: float) -> float:
        import time

        self.calls += 1
        time.sleep(value if value < 1 else 0)
        return value * 2

    def count(self) -> int:
        return self.calls


def test_actor_pool_map_submits_at_once_and_a_timeout_leaves_it_usable(
    cluster: RayContext,
) -> None:
    from sdk.util import ActorPool

    actors = [Doubler.remote(), Doubler.remote()]
    pool = ActorPool(actors)
    results = pool.map(lambda a, v: a.double.remote(v), [2, 4])  # (not iterated yet)
    # submitted already: each actor ran one call before the count asked after it
    assert sorted(ray.get([a.count.remote() for a in actors])) == [1, 1]
    assert list(results) == [4, 8]
    pool.submit(lambda a, v: a.double.remote(v), 0.8)
    with pytest.raises(TimeoutError):
        pool.get_next_unordered(timeout=0.05)
    assert pool.get_next_unordered(timeout=30) == 1.6  # still there, and the pool usable
    assert list(pool.map_unordered(lambda a, v: a.double.remote(v), [5, 6])) in ([10, 12], [12, 10])


@ray.remote(max_restarts=1)
class Tally:
    def __init__(self) -> None:
        self.count = 0

    def add(self) -> int:
        self.count += 1
        return self.count


def test_kill_without_no_restart_restarts_an_actor_with_restarts_left(
    cluster: RayContext,
) -> None:
    tally = Tally.remote()
    assert ray.get([tally.add.remote(), tally.add.remote()]) == [1, 2]
    ray.kill(tally, no_restart=False)
    assert ray.get(tally.add.remote(), timeout=60) == 1  # a new instance, as in Ray
    ray.kill(tally)  # (no_restart=True: gone for good)
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(tally.add.remote(), timeout=60)


@ray.remote
class Methods:
    def plain(self, a: int, b: int = 0) -> int:
        return a + b

    @staticmethod
    def static(a: int) -> int:
        return a

    @classmethod
    def klass(cls, a: int) -> int:
        return a


def test_an_actor_methods_arguments_are_checked_at_remote(cluster: RayContext) -> None:
    actor = Methods.remote()
    with pytest.raises(TypeError, match=r"Methods\.plain\.remote\(\): missing a required"):
        actor.plain.remote()
    with pytest.raises(TypeError, match="too many positional arguments"):
        actor.static.remote(1, 2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'b'"):
        actor.klass.remote(1, b=2)
    assert ray.get([actor.plain.remote(1, b=2), actor.static.remote(3), actor.klass.remote(4)]) == [
        3,
        3,
        4,
    ]


def test_modules_beside_the_driver_script_import_in_its_tasks_and_actors(
    tmp_path: Path,
) -> None:
    """As Ray: the script's folder is on the workers' sys.path, so a task or actor can
    use a module that sits beside the script (pickled by reference, imported there)."""
    (tmp_path / "beside_the_script.py").write_text("def twice(x):\n    return 2 * x\n")
    done = run_driver(
        tmp_path,
        """
        import sdk as ray
        import beside_the_script

        @ray.remote
        def task(x):
            return beside_the_script.twice(x)

        @ray.remote
        class Holder:
            def twice(self, x):
                return beside_the_script.twice(x)

        ray.init(num_cpus=1)
        print("results", ray.get(task.remote(4)), ray.get(Holder.remote().twice.remote(5)))
        ray.shutdown()
        """,
    )
    assert "results 8 10" in done.stdout


def test_remote_refuses_an_async_function_as_ray_does() -> None:
    async def fetch() -> int:
        return 1

    with pytest.raises(ValueError, match="'async def' should not be used for remote tasks"):
        ray.remote(fetch)
    with pytest.raises(ValueError, match=r"asyncio\.run"):
        ray.remote(num_cpus=1)(fetch)


def test_before_init_state_calls_refuse_and_the_others_start_a_cluster(
    cluster: RayContext,
) -> None:
    """Ray's split: nodes(), the resource sums and timeline() need init(); put, get,
    wait, remote calls and get_runtime_context() start a cluster of their own."""
    ray.shutdown()  # (the module's cluster: made again below for the tests after)
    for call in (ray.nodes, ray.cluster_resources, ray.available_resources):
        with pytest.raises(RaySystemError, match=r"before ray\.init\(\) has been called"):
            call()
    with pytest.raises(RuntimeError, match="Timeline requires Ray to be initialized"):
        ray.timeline()
    assert not ray.is_initialized()
    assert ray.get(add.remote(2)) == 3 and ray.is_initialized()
    ray.shutdown()
    ray.init(num_cpus=1)


@ray.remote
def when_exists(path: str) -> str:
    while not os.path.exists(path):
        time.sleep(0.02)
    return "made"


def _until_calls_submitted(name: str, count: int) -> None:
    """Until the log holds ``count`` calls named ``name`` (their events are written
    behind), so that the next call is sent after them."""
    from sdk.util.state import list_tasks

    deadline = time.monotonic() + 30
    while len(list_tasks(filters=[("name", "=", name)])) < count:
        assert time.monotonic() < deadline, f"fewer than {count} {name} calls submitted"
        time.sleep(0.02)


@ray.remote(num_cpus=0)
class Echo:
    def echo(self, value: str) -> str:
        return value


@ray.remote(num_cpus=0)
class AsyncEcho:
    async def echo(self, value: str) -> str:
        return value


@pytest.mark.parametrize("direct", ["1", "0"], ids=["direct", "through-the-daemon"])
def test_concurrent_actors_run_a_ready_call_before_one_waiting_for_its_arguments(
    cluster: RayContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: str
) -> None:
    """Ray's ordering rules: an async or threaded actor runs a call whose arguments are
    here without waiting for an earlier call's; a one-at-a-time actor keeps the order
    its calls were sent in."""
    monkeypatch.setenv("CAIRN_DIRECT_ACTOR_CALLS", direct)  # (read at a first call)
    actors = {
        "async": AsyncEcho.remote(),
        "threaded": Echo.options(max_concurrency=2).remote(),
        "sync": Echo.remote(),
    }
    for actor in actors.values():
        assert ray.get(actor.echo.remote("up"), timeout=60) == "up"
    marker = tmp_path / "made"
    slow = when_exists.remote(str(marker))
    waiting = {kind: actor.echo.remote(slow) for kind, actor in actors.items()}
    ready = {kind: actor.echo.remote("ready") for kind, actor in actors.items()}
    assert ray.get([ready["async"], ready["threaded"]], timeout=60) == ["ready", "ready"]
    assert ray.wait([ready["sync"]], timeout=1.0)[0] == []  # behind the waiting call
    assert ray.wait(list(waiting.values()), timeout=0)[0] == []
    marker.touch()
    assert ray.get(list(waiting.values()), timeout=60) == ["made"] * 3
    assert ray.get(ready["sync"], timeout=60) == "ready"


def test_a_placement_group_that_can_never_fit_is_reported_infeasible(
    cluster: RayContext,
) -> None:
    """As Ray: it stays PENDING, its ready() never resolves, and the table's stats name
    it INFEASIBLE; a group that fits is FINISHED."""
    from sdk.util.placement_group import (
        placement_group,
        placement_group_table,
        remove_placement_group,
    )

    never = placement_group([{"CPU": 100}])
    fits = placement_group([{"CPU": 1}])
    assert ray.get(fits.ready(), timeout=60) is True
    deadline = time.monotonic() + 30
    while placement_group_table(never)["stats"]["scheduling_state"] != "INFEASIBLE":
        assert time.monotonic() < deadline, placement_group_table(never)
        time.sleep(0.05)
    assert placement_group_table(never)["state"] == "PENDING"
    assert ray.wait([never.ready()], timeout=0.5)[0] == []
    assert placement_group_table(fits)["stats"]["scheduling_state"] == "FINISHED"
    remove_placement_group(never)
    remove_placement_group(fits)


@ray.remote(num_cpus=0)
class Calls:
    def __init__(self) -> None:
        self.count = 0

    def next(self) -> int:
        self.count += 1
        return self.count


@ray.remote(num_cpus=0)
class Quitter:
    def call(self, tally: object) -> str:
        if ray.get(tally.next.remote()) == 1:  # type: ignore[attr-defined]
            sys.exit(1)
        return f"pid {os.getpid()}"


@ray.remote(max_retries=0)
def quit_task() -> None:
    sys.exit(3)


def test_sys_exit_in_a_method_or_task_ends_its_worker_process_as_in_ray(
    cluster: RayContext,
) -> None:
    """Not the call's error: its process dies, so the actor restarts and the call runs
    again as max_restarts and max_task_retries allow; a task fails as after a crash."""
    tally = Calls.remote()
    quitter = Quitter.options(max_restarts=1, max_task_retries=1).remote()
    assert ray.get(quitter.call.remote(tally), timeout=60).startswith("pid ")
    assert ray.get(tally.next.remote()) == 3  # the first call, and its retry
    with pytest.raises(WorkerCrashedError):
        ray.get(quit_task.remote(), timeout=60)
    once = Quitter.remote()  # no restarts: the actor is gone
    with pytest.raises(ActorDiedError):
        ray.get(once.call.remote(Calls.remote()), timeout=60)


class Flaky(Exception):
    pass


@ray.remote(num_cpus=0)
class Streamer:
    def __init__(self) -> None:
        self.runs = 0

    @ray.method(num_returns="streaming")
    def values(self, fail_runs: int):  # type: ignore[no-untyped-def]
        self.runs += 1
        yield 1
        if self.runs <= fail_runs:
            raise Flaky(f"run {self.runs}")
        yield 2

    def count(self) -> int:
        return self.runs


def test_a_streaming_method_is_retried_on_the_exceptions_it_names(cluster: RayContext) -> None:
    """As Ray: a raise that retry_exceptions names re-runs the generator (what its caller
    took already is not given twice); out of retries, the error is the next value."""
    streamer = Streamer.remote()
    retried = streamer.values.options(retry_exceptions=[Flaky], max_task_retries=2).remote(2)
    assert [ray.get(ref, timeout=60) for ref in retried] == [1, 2]
    assert ray.get(streamer.count.remote()) == 3  # the first run and two retries
    spent = streamer.values.options(retry_exceptions=[Flaky], max_task_retries=1).remote(9)
    assert ray.get(next(spent), timeout=60) == 1
    with pytest.raises(Flaky, match="run 5"):  # (runs 4 and 5: the first and its retry)
        ray.get(next(spent), timeout=60)


@ray.remote(num_cpus=0)
class Shadowed:
    def __init__(self) -> None:
        self.called = False

    def called(self) -> bool:  # type: ignore[no-redef]  # (an attribute of the same name)
        self.called = True
        return True

    def was_called(self) -> bool:
        return self.called


def test_methods_come_from_the_class_and_every_actor_has_ray_ready(cluster: RayContext) -> None:
    """As Ray: an instance attribute does not hide a method of the same name, and
    ``__ray_ready__`` answers True once the actor is up."""
    actor = Shadowed.remote()
    assert ray.get(actor.__ray_ready__.remote(), timeout=60) is True
    assert ray.get(actor.called.remote(), timeout=60) is True
    assert ray.get(actor.called.remote(), timeout=60) is True  # still the method
    assert ray.get(actor.was_called.remote(), timeout=60) is True


@ray.remote(num_returns="dynamic")
def not_a_generator(n: int) -> list[int]:
    return list(range(n))


@ray.remote(num_returns="dynamic", retry_exceptions=[Flaky], max_retries=1)
def dynamic_flaky(calls: object):  # type: ignore[no-untyped-def]
    yield 1
    if ray.get(calls.next.remote()) == 1:  # type: ignore[attr-defined]
        raise Flaky("first run")
    yield 2


def test_dynamic_generators_are_generators_and_retried_on_named_exceptions(
    cluster: RayContext,
) -> None:
    """As Ray: num_returns="dynamic" on a function that returns a list is the task's
    error; a raise retry_exceptions names runs the generator again."""
    with pytest.raises(RayTaskError, match="not a generator"):
        ray.get(not_a_generator.remote(3), timeout=60)
    calls = Calls.remote()
    refs = list(ray.get(dynamic_flaky.remote(calls), timeout=60))
    assert ray.get(refs, timeout=60) == [1, 2]
    assert ray.get(calls.next.remote()) == 3  # the first run, and its retry


@ray.remote(num_cpus=0)
def echo_through(actor: object, boxed: list[object]) -> object:
    return ray.get(actor.echo.remote(boxed[0]))  # type: ignore[attr-defined]


def test_a_one_at_a_time_actor_orders_calls_per_caller_not_across_callers(
    cluster: RayContext, tmp_path: Path
) -> None:
    """As Ray: a call waiting for its arguments holds its own caller's later calls, not
    another caller's. (The second caller, a task of no CPUs, also gets a worker while
    the node's one CPU runs a task and its pool's other worker is blocked in get.)"""
    actor = Echo.remote()
    assert ray.get(actor.echo.remote("up"), timeout=60) == "up"
    marker = tmp_path / "made"
    slow = echo_through.remote(actor, [when_exists.remote(str(marker))])
    _until_calls_submitted("Echo.echo", 2)  # ("up" and the slow caller's, first)
    assert ray.get(echo_through.remote(actor, ["other caller"]), timeout=30) == "other caller"
    assert ray.wait([slow], timeout=0)[0] == []
    marker.touch()
    assert ray.get(slow, timeout=60) == "made"


@ray.remote(num_cpus=0)
def node_of_task() -> str:
    return ray.get_runtime_context().get_node_id()


def test_cluster_utils_makes_a_cluster_of_nodes_on_this_machine(cluster: RayContext) -> None:
    """Ray's testing cluster: a head and nodes added and removed, each a real node."""
    from controlplane import node_records
    from sdk.cluster_utils import Cluster

    ray.shutdown()  # (the module's cluster: made again below for the tests after)
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker = made.add_node(num_cpus=1, resources={"far": 1})
        made.connect()
        made.wait_for_nodes()
        far = node_of_task.options(resources={"far": 1})
        assert ray.get(far.remote(), timeout=60) == worker.node_id
        made.remove_node(worker)
        made.wait_for_nodes()
        assert [n["NodeID"] for n in ray.nodes() if n["Alive"]] == [made.head_node.node_id]  # type: ignore[union-attr]
    finally:
        made.shutdown()
    assert node_records.local_nodes() == []
    ray.init(num_cpus=1)


def test_a_job_config_sets_code_paths_namespace_and_actor_lifetime(tmp_path: Path) -> None:
    """Ray's ``init(job_config=JobConfig(...))``: its code_search_path folders import in
    workers, its namespace is the job's (in its tasks and actors too), its
    default_actor_lifetime the driver's actors'."""
    library = tmp_path / "library"
    library.mkdir()
    (library / "on_search_path.py").write_text("def thrice(x):\n    return 3 * x\n")
    done = run_driver(
        tmp_path,
        f"""
        import time

        import sdk as ray
        from sdk.util.state import get_actor

        @ray.remote
        def task(x):
            import on_search_path
            return on_search_path.thrice(x)

        @ray.remote
        def namespace_in_a_task():
            return ray.get_runtime_context().namespace

        @ray.remote
        class Holder:
            def namespace(self):
                return ray.get_runtime_context().namespace

        config = ray.job_config.JobConfig(
            code_search_path=[{str(library)!r}], ray_namespace="configured",
            default_actor_lifetime="detached",
        )
        ray.init(num_cpus=1, job_config=config)
        holder = Holder.remote()
        print("results", ray.get(task.remote(4)), ray.get_runtime_context().namespace)
        deadline = time.monotonic() + 30  # (its events are written behind)
        while (state := get_actor(holder._actor_id)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        print("actor", state.ray_namespace, state.is_detached)
        in_task = ray.get(namespace_in_a_task.remote())
        print("in workers", in_task, ray.get(holder.namespace.remote()))
        other = Holder.options(lifetime="non_detached").remote()
        ray.get(other.namespace.remote())
        while (state := get_actor(other._actor_id)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        print("another", state.is_detached)
        ray.shutdown()
        """,
    )
    assert "results 12 configured" in done.stdout
    assert "actor configured True" in done.stdout
    assert "in workers configured configured" in done.stdout  # (the job's, as Ray's)
    assert "another False" in done.stdout


def test_init_refuses_a_system_config_when_connecting_to_a_cluster(cluster: RayContext) -> None:
    """As Ray: ``_system_config`` is the cluster's, set when it starts, not a driver's."""
    ray.shutdown()  # (the module's cluster: made again below for the tests after)
    try:
        with pytest.raises(ValueError, match="_system_config must not be provided"):
            ray.init(address="127.0.0.1:1", _system_config={"object_timeout_milliseconds": 200})
        assert not ray.is_initialized()
    finally:
        ray.init(num_cpus=1)


def test_max_pending_calls_refuses_calls_past_the_limit_until_some_finish(
    cluster: RayContext, tmp_path: Path
) -> None:
    """Ray's actor option: a handle's calls not finished yet are at most
    ``max_pending_calls``; one more raises PendingCallsLimitExceeded at ``.remote()``."""
    from sdk.exceptions import PendingCallsLimitExceeded

    @ray.remote(max_pending_calls=2)
    class Gate:
        def hold(self, path: str) -> str:
            while not os.path.exists(path):
                time.sleep(0.02)
            return "passed"

    with pytest.raises(ValueError, match="max_pending_calls"):
        Gate.options(max_pending_calls=0)
    gate = Gate.remote()
    opened = str(tmp_path / "open")
    held = [gate.hold.remote(opened), gate.hold.remote(opened)]
    with pytest.raises(PendingCallsLimitExceeded, match="max_pending_calls=2"):
        gate.hold.remote(opened)
    Path(opened).touch()
    assert ray.get(held, timeout=60) == ["passed", "passed"]
    assert ray.get(gate.hold.remote(opened), timeout=60) == "passed"


def test_an_async_actors_sync_method_returns_a_stored_ref_as_a_ref(cluster: RayContext) -> None:
    """A ref a method returns is the value, as in Ray: an async actor does not await it
    (only an async method's coroutine is awaited)."""

    @ray.remote
    class Keeper:
        def __init__(self) -> None:
            self.kept: object = None

        async def keep(self) -> int:
            self.kept = add.remote(1, 2)
            return await self.kept  # type: ignore[misc]

        def give(self) -> object:
            return self.kept

    keeper = Keeper.remote()
    assert ray.get(keeper.keep.remote()) == 3
    kept = ray.get(keeper.give.remote())
    assert isinstance(kept, ray.ObjectRef)
    assert ray.get(kept) == 3


@ray.remote(num_returns="dynamic")
def dynamic_values(n: int, size: int):  # type: ignore[no-untyped-def]
    for i in range(n):
        yield bytes([i]) * size


def test_actors_and_dynamic_generators_go_to_nodes_that_join_or_have_room(
    cluster: RayContext,
) -> None:
    """With Ray's testing cluster and a head of no CPUs: an actor waiting for CPUs is
    made on a node that joins later (a call cancelled meanwhile stays cancelled); a
    dynamic generator runs on another node and its values, small and large, are got
    from there; a call cancelled while its actor's node runs it ends cancelled, and the
    actor restarts on a new node when that one is removed."""
    from sdk.cluster_utils import Cluster
    from sdk.exceptions import TaskCancelledError

    @ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)
    class Sleeper:
        async def nap(self, seconds: float) -> str:
            await asyncio.sleep(seconds)
            return "woke"

    ray.shutdown()  # (the module's cluster: made again below for the tests after)
    made = Cluster()
    try:
        made.add_node(num_cpus=0)
        ray.init(address=made.address)
        waiting = Sleeper.remote()
        cancelled = waiting.nap.remote(0)
        ray.cancel(cancelled)
        with pytest.raises(TaskCancelledError):
            ray.get(cancelled, timeout=30)
        node = made.add_node(num_cpus=2)  # (the actor's CPU, and one for tasks)
        assert ray.get(waiting.nap.remote(0), timeout=60) == "woke"

        for size in (10, 300_000):  # values in the log, and values left on their node
            values = ray.get(dynamic_values.remote(3, size), timeout=60)
            assert [ray.get(ref, timeout=30) for ref in values] == [
                bytes([i]) * size for i in range(3)
            ]

        napping = waiting.nap.remote(30)
        ray.get(waiting.__ray_ready__.remote(), timeout=30)
        ray.cancel(napping)
        made.remove_node(node)
        with pytest.raises(TaskCancelledError):
            ray.get(napping, timeout=30)
        made.add_node(num_cpus=1)
        assert ray.get(waiting.nap.remote(0), timeout=90) == "woke"
    finally:
        ray.shutdown()
        made.shutdown()
    ray.init(num_cpus=1)
