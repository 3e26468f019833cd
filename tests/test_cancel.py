"""``ray.cancel`` of running work, as Ray's documentation says it behaves (issue 18):
a running task gets KeyboardInterrupt and its caller TaskCancelledError; a task that
handles the interrupt returns its value; ``recursive`` reaches the tasks it submitted;
an async actor's running call is cancelled as a coroutine and the actor lives on; a
sync actor's queued call is dropped and its running one runs on, told by
``is_canceled()``, and ends cancelled (as Ray); ``force`` is refused for actor calls.
Each cancellation is an event.
Real node daemon, workers and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from log_rows import history
from ray_session import private_cluster

import sdk as ray
from sdk.exceptions import TaskCancelledError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    yield from private_cluster(num_cpus=2)


def _history(task_id: str, count: int) -> list[str]:
    return history(ray.get_runtime_context().gcs_address, task_id, count)


def _until(path: Path, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{path} never said {text!r}"
        time.sleep(0.02)


@ray.remote(max_retries=3)
def sleep_forever(marker: str) -> str:
    Path(marker).write_text("started")
    try:
        time.sleep(10e6)
    except KeyboardInterrupt:
        Path(marker).write_text(
            f"interrupted, is_canceled={ray.get_runtime_context().is_canceled()}"
        )
        raise
    return "never"


@ray.remote
def handle_interrupt(marker: str) -> str:
    Path(marker).write_text("started")
    try:
        time.sleep(10e6)
    except KeyboardInterrupt:
        if ray.get_runtime_context().is_canceled():
            return "canceled_via_keyboard_interrupt"
    return "completed"


def test_a_running_task_gets_keyboard_interrupt_and_is_not_retried(tmp_path: Path) -> None:
    marker = tmp_path / "task"
    ref = sleep_forever.remote(str(marker))
    _until(marker, "started")
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    _until(marker, "interrupted, is_canceled=True")
    history = _history(ref.task_id().hex(), 3)
    assert history[-1] == "cancelled" and "retried" not in history  # max_retries aside


def test_a_task_that_handles_the_interrupt_returns_its_value(tmp_path: Path) -> None:
    marker = tmp_path / "task"
    ref = handle_interrupt.remote(str(marker))
    _until(marker, "started")
    ray.cancel(ref)
    assert ray.get(ref, timeout=30) == "canceled_via_keyboard_interrupt"


@ray.remote
def parent(marker: str, child_seconds: float) -> None:
    child = sleep_for.remote(marker, child_seconds)
    Path(marker + ".child").write_text(child.task_id().hex())
    ray.get(child)


@ray.remote
def sleep_for(marker: str, seconds: float) -> str:
    Path(marker).write_text("started")
    time.sleep(seconds)
    return "slept"


def test_a_recursive_cancel_reaches_the_tasks_it_submitted(tmp_path: Path) -> None:
    marker = str(tmp_path / "recursive")
    ref = parent.remote(marker, 10e6)
    _until(Path(marker), "started")
    child_id = Path(marker + ".child").read_text()
    ray.cancel(ref)  # recursive=True is the default, as in Ray
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    assert _history(child_id, 3)[-1] == "cancelled"

    # recursive=False: the child runs to its end
    marker = str(tmp_path / "alone")
    ref = parent.remote(marker, 2.0)
    _until(Path(marker), "started")
    child_id = Path(marker + ".child").read_text()
    ray.cancel(ref, recursive=False)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    assert _history(child_id, 3)[-1] == "finished"


@ray.remote
class AsyncWaiter:
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def wait(self) -> str:
        self.seen.append("started")
        try:
            await asyncio.sleep(10e6)
        except asyncio.CancelledError:
            self.seen.append("cancelled")
            raise
        return "never"

    async def calls(self) -> list[str]:
        return self.seen

    async def is_canceled(self) -> str:
        try:
            ray.get_runtime_context().is_canceled()
        except RuntimeError as error:
            return str(error)
        return "no error"


def test_an_async_actors_running_call_is_cancelled_as_a_coroutine_and_the_actor_lives() -> None:
    waiter = AsyncWaiter.remote()
    ref = waiter.wait.remote()
    deadline = time.monotonic() + 30
    while ray.get(waiter.calls.remote()) != ["started"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ray.cancel(ref)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    assert ray.get(waiter.calls.remote(), timeout=30) == ["started", "cancelled"]  # alive
    assert "not supported in an async actor" in ray.get(waiter.is_canceled.remote())
    assert _history(ref.task_id().hex(), 3)[-1] == "cancelled"


@ray.remote
class Poller:
    def run(self, marker: str) -> str:
        Path(marker).write_text("started")
        while not ray.get_runtime_context().is_canceled():
            time.sleep(0.02)
        Path(marker).write_text("cleaned up")
        return "cleaned up"

    def other(self) -> int:
        return 1


def test_a_sync_actors_queued_call_is_dropped_and_its_running_one_told(tmp_path: Path) -> None:
    poller = Poller.remote()
    marker = tmp_path / "poller"
    running = poller.run.remote(str(marker))
    queued = poller.other.remote()
    _until(marker, "started")
    ray.cancel(queued)
    with pytest.raises(TaskCancelledError):
        ray.get(queued, timeout=30)
    with pytest.raises(ValueError, match="force=True is not supported for actor tasks"):
        ray.cancel(running, force=True)
    ray.cancel(running)
    # not interrupted: it ran to its end, then ended cancelled, as in Ray
    with pytest.raises(TaskCancelledError):
        ray.get(running, timeout=30)
    assert marker.read_text() == "cleaned up"
    assert ray.get(poller.other.remote(), timeout=30) == 1
    assert _history(queued.task_id().hex(), 2)[-1] == "cancelled"
    assert _history(running.task_id().hex(), 3)[-1] == "cancelled"
