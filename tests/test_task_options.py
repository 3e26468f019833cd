"""Task options of issue 18, as Ray documents them: ``max_calls`` (a worker runs that
many tasks of the function, then exits and another takes its place; GPU tasks default
to 1) and the ones actors refuse. Real node daemon, workers and PostgreSQL."""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_session import private_cluster

import sdk as ray

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    yield from private_cluster(num_cpus=1)  # one worker at a time: who ran what is plain


@ray.remote
def pid() -> int:
    return os.getpid()


def test_max_calls_makes_a_worker_exit_after_that_many_tasks() -> None:
    unlimited = [ray.get(pid.remote()) for _ in range(3)]
    assert len(set(unlimited)) == 1  # one worker ran them all
    twice = pid.options(max_calls=2)
    pids = [ray.get(twice.remote()) for _ in range(4)]
    ran = collections.Counter(pids)  # (which idle worker takes a task is the pool's choice)
    assert max(ran.values()) <= 2 and len(ran) >= 2
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{p}") for p, n in ran.items() if n == 2):
        assert time.monotonic() < deadline, "a worker that ran 2 tasks of max_calls=2 lives on"
        time.sleep(0.05)
    once = [ray.get(pid.options(max_calls=1).remote()) for _ in range(3)]
    assert len(set(once)) == 3


def test_max_calls_is_checked_and_refused_for_actors() -> None:
    with pytest.raises(ValueError, match="max_calls"):
        pid.options(max_calls=-1)

    with pytest.raises(ValueError, match="max_calls"):

        @ray.remote(max_calls=1)
        class Actor:
            pass


def test_timeline_gives_this_jobs_tasks_as_trace_events(tmp_path: Path) -> None:
    refs = [pid.remote() for _ in range(3)]
    ray.get(refs)
    wanted = {r.task_id().hex() for r in refs}
    deadline = time.monotonic() + 30
    while not wanted <= {e["args"]["task_id"] for e in ray.timeline() if e["ph"] == "X"}:
        assert time.monotonic() < deadline, "the tasks never reached the timeline"
        time.sleep(0.05)
    spans = [e for e in ray.timeline() if e["ph"] == "X" and e["args"]["task_id"] in wanted]
    assert {e["name"] for e in spans} == {f"{__name__}.pid"} and all(e["dur"] >= 0 for e in spans)
    out = tmp_path / "trace.json"
    assert ray.timeline(filename=str(out)) is None
    assert {e["args"]["task_id"] for e in json.loads(out.read_text()) if e["ph"] == "X"} >= wanted
