"""Actors' ``concurrency_groups`` with ``@method(concurrency_group=...)`` (issue 18), as
Ray documents them: each group runs its own calls, as many at once as its size, beside
the default group (``max_concurrency``), in threaded and in async actors. Real node
daemon, workers and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from ray_session import private_cluster

import sdk as ray

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    yield from private_cluster(num_cpus=2)


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.05)


@ray.remote(concurrency_groups={"io": 2, "probe": 1})
class Threaded:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = {"io": 0, "default": 0}
        self.most = {"io": 0, "default": 0}
        self.release = threading.Event()

    def _hold(self, group: str) -> str:
        with self.lock:
            self.running[group] += 1
            self.most[group] = max(self.most[group], self.running[group])
        self.release.wait(60)
        with self.lock:
            self.running[group] -= 1
        return group

    @ray.method(concurrency_group="io")
    def io(self) -> str:
        return self._hold("io")

    def default(self) -> str:  # the default group: max_concurrency (1)
        return self._hold("default")

    @ray.method(concurrency_group="probe")
    def state(self) -> tuple[dict[str, int], dict[str, int]]:
        with self.lock:
            return dict(self.running), dict(self.most)

    @ray.method(concurrency_group="probe")
    def go(self) -> None:
        self.release.set()


def test_a_threaded_actors_groups_run_beside_each_other_each_to_its_size() -> None:
    actor = Threaded.remote()
    calls = [actor.io.remote() for _ in range(3)] + [actor.default.remote() for _ in range(2)]
    # the probe group answers while the others are full: io runs 2, default 1
    _until(lambda: ray.get(actor.state.remote())[0] == {"io": 2, "default": 1})
    time.sleep(0.3)
    assert ray.get(actor.state.remote())[1] == {"io": 2, "default": 1}  # never more
    ray.get(actor.go.remote())
    assert ray.get(calls, timeout=60) == ["io"] * 3 + ["default"] * 2
    assert ray.get(actor.state.remote()) == ({"io": 0, "default": 0}, {"io": 2, "default": 1})


@ray.remote(concurrency_groups={"io": 2, "probe": 1})
class Async:
    """Each group runs on an event loop of its own (as Ray's), so the groups share a
    thread-safe event, not an asyncio one."""

    def __init__(self) -> None:
        self.running = self.most = 0
        self.release = threading.Event()

    @ray.method(concurrency_group="io")
    async def io(self) -> int:
        self.running += 1
        self.most = max(self.most, self.running)
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        self.running -= 1
        return 1

    @ray.method(concurrency_group="probe")
    async def state(self) -> tuple[int, int]:
        return self.running, self.most

    @ray.method(concurrency_group="probe")
    async def go(self) -> None:
        self.release.set()


def test_an_async_actors_group_runs_as_many_calls_as_its_size() -> None:
    actor = Async.remote()
    calls = [actor.io.remote() for _ in range(4)]
    _until(lambda: ray.get(actor.state.remote())[0] == 2)
    time.sleep(0.3)
    assert ray.get(actor.state.remote()) == (2, 2)  # the others wait for a slot
    ray.get(actor.go.remote())
    assert ray.get(calls, timeout=60) == [1, 1, 1, 1]
    assert ray.get(actor.state.remote()) == (0, 2)


def test_a_method_in_an_undeclared_group_is_refused() -> None:
    @ray.remote(concurrency_groups={"io": 1})
    class Wrong:
        @ray.method(concurrency_group="disk")
        def write(self) -> None:
            pass

    with pytest.raises(ValueError, match="concurrency group 'disk'"):
        Wrong.remote()
    with pytest.raises(ValueError, match="concurrency_groups"):

        @ray.remote(concurrency_groups={"io": 0})
        class Empty:
            pass


@ray.remote(concurrency_groups={"other": 1})
class Blocker:
    def __init__(self) -> None:
        self.constructor_loop = asyncio.get_event_loop()

    async def block(self, seconds: float) -> None:
        time.sleep(seconds)  # holds its group's event loop, as it would in Ray

    @ray.method(concurrency_group="other")
    def ok(self) -> str:
        return "ok"

    def on_constructor_loop(self) -> bool:
        return asyncio.get_event_loop() is self.constructor_loop


def test_an_async_actors_groups_each_have_an_event_loop_of_their_own() -> None:
    """As Ray: a call that blocks the default group's loop holds no other group's
    calls, and the default group's loop is the one the constructor saw."""
    actor = Blocker.remote()
    assert ray.get(actor.on_constructor_loop.remote(), timeout=60) is True
    blocked = actor.block.remote(20)
    assert ray.get(actor.ok.remote(), timeout=10) == "ok"
    ray.kill(actor)
    del blocked
