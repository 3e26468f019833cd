"""Task options of issue 18, as Ray documents them: ``max_calls`` (a worker runs that
many tasks of the function, then exits and another takes its place; GPU tasks default
to 1) and the ones actors refuse. Real node daemon, workers and PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import sdk as ray

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    ray.init(num_cpus=1)  # one worker at a time: who ran what is plain
    try:
        yield
    finally:
        ray.shutdown()


@ray.remote
def pid() -> int:
    return os.getpid()


def test_max_calls_makes_a_worker_exit_after_that_many_tasks() -> None:
    unlimited = [ray.get(pid.remote()) for _ in range(3)]
    assert len(set(unlimited)) == 1  # one worker ran them all
    twice = pid.options(max_calls=2)
    pids = [ray.get(twice.remote()) for _ in range(4)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2]
    once = [ray.get(pid.options(max_calls=1).remote()) for _ in range(3)]
    assert len(set(once)) == 3


def test_max_calls_is_checked_and_refused_for_actors() -> None:
    with pytest.raises(ValueError, match="max_calls"):
        pid.options(max_calls=-1)

    with pytest.raises(ValueError, match="max_calls"):

        @ray.remote(max_calls=1)
        class Actor:
            pass
