"""The options of actor methods (issue 18), as Ray's ``@ray.method(...)`` and
``actor.method.options(...)``: ``num_returns``, ``max_task_retries`` and
``retry_exceptions`` per method (over the actor's max_task_retries; each retry a
``retried`` event), ``name`` (the call's name in the log and in get_task_name()),
``concurrency_group`` per call; what Cairn cannot honour is refused by name."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from log_rows import wait_for_rows
from ray_session import private_cluster

import sdk as ray
from sdk.exceptions import ActorUnavailableError

pytestmark = pytest.mark.timeout(180)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    yield from private_cluster(num_cpus=2)


class Flaky(Exception):
    pass


@ray.remote
class Failing:
    """Methods that raise their first ``fails`` times."""

    def __init__(self) -> None:
        self.calls = 0

    def _fail_first(self, fails: int, error: type[Exception] = Flaky) -> int:
        self.calls += 1
        if self.calls <= fails:
            raise error(f"call {self.calls}")
        return self.calls

    @ray.method(max_task_retries=2, retry_exceptions=True)
    def retried(self, fails: int) -> int:
        return self._fail_first(fails)

    @ray.method(max_task_retries=3, retry_exceptions=[Flaky])
    def only_flaky(self, fails: int, error: type[Exception]) -> int:
        return self._fail_first(fails, error)

    @ray.method(retry_exceptions=True)
    def actor_retries(self, fails: int) -> int:
        return self._fail_first(fails)

    def plain(self, fails: int) -> int:
        return self._fail_first(fails)

    @ray.method(num_returns=2, enable_task_events=True)
    def pair(self) -> tuple[int, int]:
        return 1, 2

    def task_name(self) -> str | None:
        return ray.get_runtime_context().get_task_name()


def _retries(url: str, task_id: str, count: int) -> list[str]:
    found = wait_for_rows(
        url,
        "SELECT payload->>'reason' AS reason FROM events "
        "WHERE entity_id = $1 AND event_type = 'retried' ORDER BY position",
        task_id,
        count=count,
    )
    return [row["reason"] for row in found]


def test_a_method_retries_the_exceptions_it_names() -> None:
    url = ray.get_runtime_context().gcs_address
    actor = Failing.remote()  # max_task_retries=0: the method's own count
    ref = actor.retried.remote(2)
    assert ray.get(ref, timeout=60) == 3
    assert len(_retries(url, ref.task_id().hex(), 2)) == 2
    with pytest.raises(Flaky, match="call 6"):  # three more raise: two retries, then fails
        ray.get(actor.retried.remote(6), timeout=60)
    assert ray.get(actor.only_flaky.remote(8, Flaky), timeout=60) == 9
    with pytest.raises(TypeError, match="call 10"):  # not listed: never retried
        ray.get(actor.only_flaky.remote(12, TypeError), timeout=60)
    with pytest.raises(Flaky):  # no retry_exceptions: a raise is the answer
        ray.get(actor.plain.remote(11), timeout=60)


def test_call_options_override_the_method_and_the_actor() -> None:
    actor = Failing.options(max_restarts=1, max_task_retries=1).remote()
    # the actor's max_task_retries (1) with the method's retry_exceptions
    assert ray.get(actor.actor_retries.remote(1), timeout=60) == 2
    # .options() over @method: no retries for this call
    with pytest.raises(Flaky, match="call 3"):
        ray.get(actor.retried.options(max_task_retries=0).remote(3), timeout=60)
    # .options() turning retries on for a plain method
    retried = actor.plain.options(max_task_retries=2, retry_exceptions=True)
    assert ray.get(retried.remote(5), timeout=60) == 6


@ray.remote(max_restarts=1)
class DiesOnce:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    @ray.method(max_task_retries=1)
    def survive(self) -> int:
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return os.getpid()


def test_a_method_max_task_retries_resends_a_call_its_worker_died_in(tmp_path: Path) -> None:
    actor = DiesOnce.remote(str(tmp_path / "died"))  # the actor's own max_task_retries: 0
    assert ray.get(actor.survive.remote(), timeout=60) != os.getpid()
    again = DiesOnce.remote(str(tmp_path / "again"))
    # without the method's retry the call fails with its process; the actor restarts
    with pytest.raises(ActorUnavailableError):
        ray.get(again.survive.options(max_task_retries=0).remote(), timeout=60)


def test_name_and_num_returns_of_a_call() -> None:
    url = ray.get_runtime_context().gcs_address
    actor = Failing.remote()
    assert ray.get(actor.task_name.remote(), timeout=60) == "Failing.task_name"
    named = actor.task_name.options(name="step-1").remote()
    assert ray.get(named, timeout=60) == "step-1"
    logged = wait_for_rows(
        url,
        "SELECT payload->>'name' AS name FROM events "
        "WHERE entity_id = $1 AND event_type = 'submitted'",
        named.task_id().hex(),
    )
    assert logged[0]["name"] == "step-1"
    assert ray.get(actor.pair.remote(), timeout=60) == [1, 2]
    assert ray.get(actor.pair.options(num_returns=1).remote(), timeout=60) == (1, 2)


@ray.remote(concurrency_groups={"io": 1})
class Grouped:
    def thread(self) -> str:
        return threading.current_thread().name


def test_a_call_runs_in_the_concurrency_group_its_options_name() -> None:
    actor = Grouped.remote()
    assert "io" not in ray.get(actor.thread.remote(), timeout=60)
    assert "io" in ray.get(actor.thread.options(concurrency_group="io").remote(), timeout=60)
    with pytest.raises(ValueError, match="'disk' is not one of the actor's"):
        actor.thread.options(concurrency_group="disk")


def test_what_cannot_be_honoured_is_refused_by_name() -> None:
    plain = Failing.remote().plain
    for options, said in (
        ({"_generator_backpressure_num_objects": 2}, "applies to streaming generators only"),
        ({"enable_task_events": False}, "enable_task_events"),
        ({"tensor_transport": "nccl"}, "tensor_transport"),
        ({"max_task_retries": -2}, "max_task_retries must be an int >= -1"),
        ({"retry_exceptions": [int]}, "retry_exceptions must be a bool or a list"),
    ):
        with pytest.raises(ValueError, match=said):
            ray.method(**options)
        with pytest.raises(ValueError, match=said):
            plain.options(**options)
    with pytest.raises(TypeError, match="Unexpected keyword argument to @method: 'name'"):
        ray.method(name="x")  # as Ray: a call's name is given in .options()
    with pytest.raises(TypeError, match="'bogus'"):
        plain.options(bogus=1)
    with pytest.raises(TypeError, match="at least one of the arguments"):
        ray.method()
