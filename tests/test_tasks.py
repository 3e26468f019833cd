"""Ray Core semantics of tasks and objects, on a real node daemon with real worker
processes, shared memory and PostgreSQL (``import sdk as ray``)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import numpy as np
import pytest
from log_rows import history, rows, wait_for_rows
from processes import pids_with
from store_objects import flip
from workloads import add, square

import sdk as ray
from controlplane.projections import Projector
from dataplane import shm
from sdk.exceptions import (
    GetTimeoutError,
    ObjectStoreFullError,
    RayTaskError,
    TaskCancelledError,
    WorkerCrashedError,
)
from sdk.util import state

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, object_store_memory=1536 * 1024 * 1024)
    try:
        yield
    finally:
        node_id = ray.get_runtime_context().get_node_id()
        ray.shutdown()
        assert list(shm.SHM_DIR.glob(f"{node_id}-*")) == []


@ray.remote
def identity(x: object) -> object:
    return x


@ray.remote
def fail(message: str) -> None:
    raise ValueError(message)


@ray.remote
def sleep_then(seconds: float, value: object = None) -> object:
    time.sleep(seconds)
    return value


def test_tasks_run_and_refs_become_values() -> None:
    refs = [square.remote(i) for i in range(10)]
    assert ray.get(refs) == [i * i for i in range(10)]
    assert ray.get(add.remote(square.remote(3), square.remote(4))) == 25
    assert ray.get(add.remote(ray.put(1), b=ray.put(2))) == 3


def test_refs_nested_in_containers_stay_refs() -> None:
    inner = ray.put(41)
    result = ray.get(identity.remote([inner, {"k": inner}]))
    assert isinstance(result[0], ray.ObjectRef) and result[0] == inner
    assert ray.get(result[1]["k"]) == 41


def test_object_refs_are_hashable_and_picklable() -> None:
    import pickle

    ref = ray.put("x")
    assert {ref: 1}[ref] == 1
    assert pickle.loads(pickle.dumps(ref)) == ref


def test_num_returns_gives_that_many_refs() -> None:
    @ray.remote(num_returns=3)
    def three() -> tuple[int, int, int]:
        return 1, 2, 3

    refs = three.remote()
    assert len(refs) == 3
    assert ray.get(refs) == [1, 2, 3]
    assert ray.get(three.options(num_returns=1).remote()) == (1, 2, 3)


def test_exception_is_a_ray_task_error_and_the_original_class() -> None:
    ref = fail.remote("bad input")
    with pytest.raises(RayTaskError) as caught:
        ray.get(ref)
    assert isinstance(caught.value, ValueError)
    assert "bad input" in str(caught.value)
    assert "Traceback" in str(caught.value) and "in fail" in str(caught.value)
    with pytest.raises(ValueError, match="bad input"):
        ray.get(ref)


def test_failing_upstream_fails_downstream_with_the_same_error() -> None:
    with pytest.raises(ValueError, match="upstream broke"):
        ray.get(add.remote(fail.remote("upstream broke"), 1))


def test_wait_returns_in_ready_order_and_honours_timeout() -> None:
    slow = sleep_then.remote(1.5, "slow")
    fast = sleep_then.remote(0.1, "fast")
    ready, not_ready = ray.wait([slow, fast], num_returns=1)
    assert ready == [fast] and not_ready == [slow]
    ready, not_ready = ray.wait([slow], num_returns=1, timeout=0.1)
    assert ready == [] and not_ready == [slow]
    ready, _ = ray.wait([slow, fast], num_returns=2)
    assert set(ready) == {slow, fast}


def test_get_timeout_raises_get_timeout_error() -> None:
    ref = sleep_then.remote(2)
    started = time.monotonic()
    with pytest.raises(GetTimeoutError):
        ray.get(ref, timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert ray.get(ref) is None


def _history(task_id: str, count: int) -> list[str]:
    return history(ray.get_runtime_context().gcs_address, task_id, count)


def _wait_until_running(*refs: ray.ObjectRef) -> None:
    """Until each task's ``running`` event is in the log (the task was sent to a worker)."""
    wait_for_rows(
        ray.get_runtime_context().gcs_address,
        "SELECT entity_id FROM events WHERE event_type = 'running' AND entity_id = ANY($1)",
        [ref.task_id().hex() for ref in refs],
        count=len(refs),
    )


def test_cancel_queued_and_force_cancel_running() -> None:
    blockers = [sleep_then.remote(2) for _ in range(2)]  # occupy both CPUs
    _wait_until_running(*blockers)
    queued = square.remote(5)
    ray.cancel(queued)
    with pytest.raises(TaskCancelledError):
        ray.get(queued)
    assert _history(queued.task_id().hex(), 2) == ["submitted", "cancelled"]  # it never ran
    running = sleep_then.remote(30)
    ray.get(blockers)
    _wait_until_running(running)
    ray.cancel(running, force=True)
    with pytest.raises(TaskCancelledError):
        ray.get(running, timeout=10)
    assert _history(running.task_id().hex(), 3)[-2:] == ["running", "cancelled"]
    assert ray.get(square.remote(3)) == 9  # the pool recovered


def test_nested_tasks_do_not_deadlock() -> None:
    @ray.remote
    def fan_out(n: int) -> int:
        return sum(ray.get([square.remote(i) for i in range(n)]))

    assert ray.get([fan_out.remote(5) for _ in range(4)]) == [30] * 4


def test_workers_started_beyond_the_pool_retire_once_idle() -> None:
    """Tasks blocked in get() lend their CPUs out: the pool grows past its size (2) for
    the nested ones, and those workers beyond it exit once idle a second (as Ray's idle
    workers above its soft limit), their end an intended one, not an error."""

    @ray.remote
    def fan_out(n: int) -> int:
        return sum(ray.get([square.remote(i) for i in range(n)]))

    assert ray.get([fan_out.remote(3) for _ in range(4)]) == [5] * 4
    deadline = time.monotonic() + 30
    while True:
        workers = state.list_workers(limit=10_000, detail=True)
        alive = [w for w in workers if w.is_alive]
        retired = [w for w in workers if (w.exit_detail or "").startswith("retired")]
        if len(alive) == 2 and len(retired) >= 2:
            break
        assert time.monotonic() < deadline, (len(alive), [w.exit_detail for w in workers])
        time.sleep(0.2)
    assert {w.exit_type for w in retired} == {"INTENDED_SYSTEM_EXIT"}
    assert ray.get(fan_out.remote(2)) == 1  # the pool still serves


def test_killed_worker_is_replaced_and_the_task_retried(tmp_path: Path) -> None:
    marker = tmp_path / "attempts"

    @ray.remote(max_retries=2)
    def die_once(path: str) -> int:
        with open(path, "a") as f:
            f.write("x")
        if len(Path(path).read_text()) == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return os.getpid()

    assert ray.get(die_once.remote(str(marker))) > 0
    assert marker.read_text() == "xx"

    @ray.remote(max_retries=0)
    def die(path: str) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(WorkerCrashedError):
        ray.get(die.remote(str(marker)))


def _store_used() -> int:
    used: int = ray.api.client_or_auto_init().cluster_info()["object_store_used"]
    return used


def _until_store_used_is_at_most(limit: int) -> int:
    deadline = time.monotonic() + 10
    while (used := _store_used()) > limit and time.monotonic() < deadline:
        time.sleep(0.05)
    return used


def test_a_writer_killed_while_writing_leaves_no_room_taken(tmp_path: Path) -> None:
    """A worker killed after the node gave it room for a large result, before it sent
    the result: the node takes the room back when the worker's connection ends (no
    range is lost for good), and the retry writes the result anew."""
    marker = tmp_path / "attempts"
    before = _store_used()

    @ray.remote(max_retries=1)
    def killed_while_writing(path: str) -> np.ndarray:
        from dataplane import protocol as p
        from sdk import runtime

        with open(path, "a") as f:
            f.write("x")
        if len(Path(path).read_text()) == 1:  # room for a result, then killed
            client = runtime.client_or_auto_init()
            client.request(lambda rid: p.ReserveShm(rid, 256 * 1024 * 1024))
            os.kill(os.getpid(), signal.SIGKILL)
        return np.arange(1_000_000)

    ref = killed_while_writing.remote(str(marker))
    result = ray.get(ref)
    assert marker.read_text() == "xx"
    assert result.sum() == np.arange(1_000_000).sum()
    del ref, result
    assert _until_store_used_is_at_most(before) <= before


def test_application_errors_are_retried_only_with_retry_exceptions(tmp_path: Path) -> None:
    @ray.remote(max_retries=3)
    def flaky(path: str) -> str:
        with open(path, "a") as f:
            f.write("x")
        if len(Path(path).read_text()) < 3:
            raise RuntimeError("not yet")
        return "ok"

    no_retry = tmp_path / "a"
    with pytest.raises(RuntimeError):
        ray.get(flaky.remote(str(no_retry)))
    assert no_retry.read_text() == "x"
    retry = tmp_path / "b"
    assert ray.get(flaky.options(retry_exceptions=True).remote(str(retry))) == "ok"
    assert retry.read_text() == "xxx"
    listed = tmp_path / "c"  # only the listed exception classes are retried
    assert ray.get(flaky.options(retry_exceptions=[RuntimeError]).remote(str(listed))) == "ok"
    unlisted = tmp_path / "d"
    with pytest.raises(RuntimeError):
        ray.get(flaky.options(retry_exceptions=[KeyError]).remote(str(unlisted)))
    assert unlisted.read_text() == "x"
    with pytest.raises(ValueError, match="list of exception classes"):
        flaky.options(retry_exceptions=["RuntimeError"])


def _mapped_from_shm(address: int) -> bool:
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= address < end:
            return bool(rest) and rest[-1].startswith("/dev/shm/")
    return False


def test_get_of_a_large_array_maps_shared_memory_without_copy() -> None:
    @ray.remote
    def make(n: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64)

    n = 128 * 1024 * 1024  # 1 GiB, written by a worker process
    ref = make.remote(n)
    array = ray.get(ref)
    assert array.nbytes == 1024**3 and array[-1] == n - 1
    assert not array.flags.writeable
    assert _mapped_from_shm(array.__array_interface__["data"][0])
    with pytest.raises(ValueError):
        array[0] = 1
    again = ray.get(ref)  # a second get: the same pages, still no copy
    assert _mapped_from_shm(again.__array_interface__["data"][0])


def test_get_of_a_pyarrow_table_maps_shared_memory() -> None:
    import pyarrow as pa

    @ray.remote
    def table() -> pa.Table:
        return pa.table({"x": np.arange(4_000_000), "y": np.ones(4_000_000)})

    result = ray.get(table.remote())
    assert result.num_rows == 4_000_000 and result.column("x")[-1].as_py() == 3_999_999
    buffer = result.column("x").chunk(0).buffers()[1]
    assert _mapped_from_shm(buffer.address)


def test_bad_input_gives_clear_errors() -> None:
    import threading

    with pytest.raises(TypeError, match=r"try '.*square.remote\(\)'"):
        square(3)
    with pytest.raises(TypeError, match="lock"):
        square.remote(threading.Lock())
    with pytest.raises(ValueError, match="ObjectRef or a list of ObjectRefs"):
        ray.get(3)  # type: ignore[arg-type]

    @ray.remote
    def unpicklable_result() -> object:
        return threading.Lock()

    with pytest.raises(RayTaskError, match="lock"):
        ray.get(unpicklable_result.remote())
    with pytest.raises(ValueError, match="Invalid option keyword"):
        square.options(num_gpu=1)


def test_put_larger_than_the_store_raises_and_the_store_stays_usable() -> None:
    with pytest.raises(ObjectStoreFullError, match="cannot fit"):
        ray.put(np.zeros(1600 * 1024 * 1024, dtype=np.uint8))
    big = ray.put(np.ones(50 * 1024 * 1024, dtype=np.uint8))
    assert int(ray.get(big).sum()) == 50 * 1024 * 1024


def test_objects_are_freed_when_no_ref_remains() -> None:
    regions = set(shm.SHM_DIR.glob(f"{ray.get_runtime_context().get_node_id()}-*"))
    ref = ray.put(np.ones(10 * 1024 * 1024, dtype=np.uint8))
    without = _store_used() - 10 * 1024 * 1024  # (others of earlier tests may go too)
    assert without >= 0
    del ref
    assert _until_store_used_is_at_most(without) <= without
    # the store's regions stay (their pages mapped by every process, ready for reuse);
    # the one a first object needed may be new
    after = set(shm.SHM_DIR.glob(f"{ray.get_runtime_context().get_node_id()}-*"))
    assert regions <= after and all("-arena-" in path.name for path in after)


def test_a_value_being_read_keeps_its_memory_while_its_room_is_reused() -> None:
    import gc

    ref = ray.put(np.full(4 * 1024 * 1024, 7, dtype=np.int64))
    kept = ray.get(ref)
    del ref  # the object is still mapped by `kept`: it must not be recycled
    for value in range(5):
        other = ray.put(np.full(4 * 1024 * 1024, value, dtype=np.int64))
        assert int(ray.get(other)[-1]) == value
        del other
        gc.collect()
    assert int(kept.min()) == 7 and int(kept.max()) == 7
    del kept
    gc.collect()
    again = ray.put(np.full(4 * 1024 * 1024, 9, dtype=np.int64))  # may reuse its room
    assert int(ray.get(again).sum()) == 9 * 4 * 1024 * 1024


async def test_the_log_holds_every_transition_and_folds_to_the_projection() -> None:
    refs = [square.remote(i) for i in range(20)]
    assert ray.get(refs) == [i * i for i in range(20)]
    url = ray.get_runtime_context().gcs_address
    task_ids = [r.task_id().hex() for r in refs]
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT entity_id, event_type FROM events WHERE entity_id = ANY($1::text[]) "
            "ORDER BY position",
            task_ids,
        )
        for task_id in task_ids:
            # scheduled and run in one commit: one `running` event says both
            assert [r["event_type"] for r in rows if r["entity_id"] == task_id] == [
                "submitted",
                "running",
                "finished",
            ]
        scheduled = await conn.fetchval(
            "SELECT count(*) FROM tasks WHERE task_id = ANY($1::text[]) "
            "AND scheduled_at = started_at",
            task_ids,
        )
        assert scheduled == 20  # (the view's scheduled_at: that event's time)
        created = await conn.fetchval(
            "SELECT count(*) FROM events WHERE entity_kind = 'object' AND event_type = 'created'"
            " AND payload->>'task_id' = ANY($1::text[])",
            task_ids,
        )
        assert created == 20
        async with Projector(url) as projector:
            await projector.catch_up()
        states = await conn.fetch(
            "SELECT state, name FROM tasks WHERE task_id = ANY($1::text[])", task_ids
        )
        assert {(r["state"], r["name"]) for r in states} == {("FINISHED", square._qualname)}
    finally:
        await conn.close()


async def test_a_fresh_fold_of_the_log_reproduces_the_projections_exactly() -> None:
    from test_projections import fold_of_whole_log, projection_tables

    ray.get([add.remote(square.remote(i), 1) for i in range(10)])
    with pytest.raises(ValueError):
        ray.get(fail.remote("for the log"))
    url = ray.get_runtime_context().gcs_address
    async with Projector(url) as projector:
        await projector.catch_up()
    tables = await projection_tables(url)
    folded = await fold_of_whole_log(url)
    # events appended after catch_up (e.g. objects freed meanwhile) are not in the tables
    async with Projector(url) as projector:
        await projector.catch_up()
    assert await projection_tables(url) == await fold_of_whole_log(url)
    assert tables.keys() <= folded.keys()


def test_object_refs_are_awaitable_and_have_futures() -> None:
    import asyncio

    ref = square.remote(6)
    assert ref.future().result(timeout=10) == 36

    async def main() -> list[int]:
        return [await square.remote(2), await ref]

    assert asyncio.run(main()) == [4, 36]
    failing = fail.remote("in a future")
    with pytest.raises(ValueError, match="in a future"):
        failing.future().result(timeout=10)


def test_runtime_context_and_cluster_resources() -> None:
    context = ray.get_runtime_context()
    assert context.get_task_id() is None
    assert context.gcs_address.startswith("postgresql://")

    @ray.remote
    def where() -> tuple[str | None, str, str]:
        c = ray.get_runtime_context()
        return c.get_task_id(), c.get_node_id(), c.get_job_id()

    ref = where.remote()
    task_id, node_id, job_id = ray.get(ref)
    assert task_id == ref.task_id().hex() and isinstance(ref.task_id(), ray.TaskID)
    assert (node_id, job_id) == (context.get_node_id(), context.get_job_id())
    assert ray.cluster_resources()["CPU"] == 2
    assert [n["NodeID"] for n in ray.nodes()] == [context.get_node_id()]
    assert ray.is_initialized()
    again = ray.init(ignore_reinit_error=True, include_dashboard=False)
    assert again.get_job_id() == context.get_job_id()
    with pytest.raises(RuntimeError, match=r"ray\.init twice"):
        ray.init()
    with pytest.raises(TypeError, match="bogus"):
        ray.init(bogus=1)
    deadline = time.monotonic() + 5
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ray.available_resources()["CPU"] == 2


def _worker_pids() -> set[int]:
    """This cluster's worker processes (other clusters may run on the machine)."""
    return set(pids_with("dataplane.worker", ray.get_runtime_context().get_node_id()))


@pytest.mark.timeout(300)
def test_hundred_thousand_tiny_tasks_leave_no_leak() -> None:
    @ray.remote
    def tiny(i: int) -> int:
        return i

    info = lambda: ray.api.client_or_auto_init().cluster_info()  # noqa: E731
    before, workers_before = info(), _worker_pids()
    total = 0
    for start in range(0, 100_000, 10_000):
        total += sum(ray.get([tiny.remote(i) for i in range(start, start + 10_000)]))
    assert total == sum(range(100_000))
    deadline = time.monotonic() + 10
    while info()["objects"] > before["objects"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = info()
    assert after["objects"] <= before["objects"]
    assert after["object_store_used"] <= before["object_store_used"]
    assert _worker_pids() == workers_before


async def test_an_object_whose_bytes_were_damaged_is_lost_and_logged() -> None:
    from sdk.exceptions import ObjectLostError

    ref = ray.put(np.ones(1024 * 1024, dtype=np.uint8))
    flip(ref, 0, 16, mask=0xFF)  # its framing, behind the node's back
    with pytest.raises(ObjectLostError, match=r"its bytes are corrupt"):
        ray.get(ref)
    with pytest.raises(ObjectLostError):  # and stays lost, for everyone
        ray.get(identity.remote(ref))
    conn = await asyncpg.connect(ray.get_runtime_context().gcs_address)
    try:
        reason = await conn.fetchval(
            "SELECT payload->>'reason' FROM events WHERE entity_id = $1 AND event_type = 'lost'",
            ref.hex(),
        )
    finally:
        await conn.close()
    assert reason is not None and "corrupt" in reason


def test_scheduling_strategies_on_a_single_node() -> None:
    from sdk.exceptions import TaskUnschedulableError
    from sdk.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote
    def node() -> str:
        return ray.get_runtime_context().get_node_id()

    here = ray.get_runtime_context().get_node_id()
    assert ray.get(node.options(scheduling_strategy="SPREAD").remote()) == here
    mine = NodeAffinitySchedulingStrategy(here, soft=False)
    assert ray.get(node.options(scheduling_strategy=mine).remote()) == here
    elsewhere = NodeAffinitySchedulingStrategy("0" * 32, soft=True)
    assert ray.get(node.options(scheduling_strategy=elsewhere).remote()) == here
    with pytest.raises(TaskUnschedulableError, match="not in the cluster"):
        hard = NodeAffinitySchedulingStrategy("0" * 32, soft=False)
        ray.get(node.options(scheduling_strategy=hard).remote(), timeout=30)
    with pytest.raises(ValueError, match="node_id must be"):
        NodeAffinitySchedulingStrategy("", soft=True)


def test_gpus_are_given_out_one_by_one() -> None:
    """On a node declared with 2 GPUs (none needed to test the bookkeeping): a task
    sees only its GPUs in CUDA_VISIBLE_DEVICES; fractions share one GPU; an actor
    keeps its GPU for its life."""
    ray.shutdown()
    ray.init(num_cpus=4, num_gpus=2)
    try:

        @ray.remote(num_gpus=1)
        def one(pause_s: float) -> tuple[str, list]:
            time.sleep(pause_s)
            return os.environ["CUDA_VISIBLE_DEVICES"], ray.get_gpu_ids()

        @ray.remote(num_gpus=0.5)
        def half() -> str:
            time.sleep(0.5)
            return os.environ["CUDA_VISIBLE_DEVICES"]

        @ray.remote
        def none() -> str | None:
            return os.environ.get("CUDA_VISIBLE_DEVICES")

        @ray.remote(num_gpus=1)
        class OnGpu:
            def devices(self) -> tuple[str, list]:
                return os.environ["CUDA_VISIBLE_DEVICES"], ray.get_gpu_ids()

        both = ray.get([one.remote(0.5), one.remote(0.5)])
        assert sorted(d for d, _ in both) == ["0", "1"]
        assert sorted(ids[0] for _, ids in both) == [0, 1]
        assert len(set(ray.get([half.remote() for _ in range(4)]))) == 2  # 2 per GPU
        assert ray.get(none.remote()) == os.environ.get("CUDA_VISIBLE_DEVICES")
        actor = OnGpu.remote()
        mine = ray.get(actor.devices.remote())
        assert mine == ray.get(actor.devices.remote()) and len(mine[1]) == 1
        other, _ = ray.get(one.remote(0))  # the other GPU: the actor keeps its own
        assert other != mine[0]
        ray.kill(actor)
        assert ray.get_gpu_ids() == []
    finally:
        ray.shutdown()
        ray.init(num_cpus=2, object_store_memory=1536 * 1024 * 1024)


@ray.remote
def refs_made_inside(n: int) -> list[ray.ObjectRef]:
    return [ray.put(f"inner {i}") for i in range(n)]


def test_refs_returned_inside_a_result_outlive_the_task_that_made_them() -> None:
    """The task drops its refs as it returns them, and the caller drops the outer
    object at once: the refs inside stay readable (before, they were freed in between:
    ObjectLostError)."""
    url = ray.get_runtime_context().gcs_address
    for n in (1, 20):
        outer = refs_made_inside.remote(n)
        outer_id = outer.hex()
        inner = ray.get(outer)
        del outer
        # the outer object is freed: nothing pins the refs inside it any more but this
        # process's holds (the task let its own go as it returned)
        wait_for_rows(
            url, "SELECT 1 FROM events WHERE entity_id = $1 AND event_type = 'freed'", outer_id
        )
        assert ray.get(inner) == [f"inner {i}" for i in range(n)]
        gone = rows(
            url,
            "SELECT entity_id FROM events WHERE entity_id = ANY($1) "
            "AND event_type IN ('freed', 'lost')",
            [ref.hex() for ref in inner],
        )
        assert gone == []
