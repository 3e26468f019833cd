"""Direct actor calls (issue 4's benchmark rows): a caller on the actor's node sends its
calls straight to the actor's worker, which answers it directly; the daemon records
every call from its copy. These tests check that calls take that way, keep their
order across the switch to it, resolve ref arguments, survive the actor's death as
daemon-sent calls do, and all reach the log."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from log_rows import rows, wait_for_rows

import sdk as ray
from dataplane import protocol as p
from dataplane.begun_calls import begun_calls_path
from dataplane.protocol import direct_socket_path
from sdk.api import client_or_auto_init
from sdk.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("private_cluster")]

_CALL_EVENTS = """
SELECT entity_id, event_type FROM events
WHERE entity_kind = 'task' AND entity_id IN (
    SELECT entity_id FROM events
    WHERE event_type = 'submitted' AND payload->>'actor_id' = $1 AND payload->>'method' = $2
)
ORDER BY position
"""


@ray.remote
class Log:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        self.n = 0

    def pid(self) -> int:
        return os.getpid()

    def add(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def record(self, caller: str, seq: int) -> None:
        self.seen.append((caller, seq))

    def history(self) -> list[tuple[str, int]]:
        return self.seen

    def slow(self, seconds: float, started: str = "") -> int:
        if started:  # tells the test it has begun
            Path(started).touch()
        time.sleep(seconds)
        return self.n


@ray.remote
def make_calls(actor: ray.actor.ActorHandle, caller: str, n: int) -> int:
    ray.get([actor.record.remote(caller, i) for i in range(n)])
    return n


@ray.remote
def later(value: int, seconds: float) -> int:
    time.sleep(seconds)
    return value


@ray.remote
def broken() -> int:
    raise KeyError("no such key")


def _gcs() -> str:
    return ray.get_runtime_context().gcs_address


def _went_direct(actor: ray.actor.ActorHandle, method: str, count: int) -> dict[str, bool]:
    """For each call of ``method`` to the actor (task id), in order: whether it went
    straight to the actor (its ``submitted`` event says so), once all ``count`` are in
    the log."""
    submitted = wait_for_rows(
        _gcs(),
        "SELECT entity_id, payload FROM events WHERE event_type = 'submitted' "
        "AND payload->>'actor_id' = $1 AND payload->>'method' = $2 ORDER BY position",
        actor._actor_id,
        method,
        count=count,
    )
    return {row["entity_id"]: '"direct": true' in row["payload"] for row in submitted}


def _workers_of(actor: ray.actor.ActorHandle) -> list[str]:
    """The workers the actor has lived in, from its ``alive`` events."""
    found = rows(
        _gcs(),
        "SELECT payload->>'worker_id' AS worker FROM events WHERE entity_kind = 'actor' "
        "AND entity_id = $1 AND event_type = 'alive' ORDER BY position",
        actor._actor_id,
    )
    return [row["worker"] for row in found]


def _files_of(worker_id: str) -> list[Path]:
    """The direct-call socket and begun-calls file of an actor's worker, if still there."""
    session = client_or_auto_init().welcome.session_dir
    paths = [direct_socket_path(session, worker_id), begun_calls_path(session, worker_id)]
    return [Path(path) for path in paths if Path(path).exists()]


def test_calls_after_the_first_go_straight_to_the_actor_and_all_reach_the_log() -> None:
    actor = Log.remote()
    assert ray.get(actor.add.remote()) == 1  # through the daemon: no route yet
    assert [ray.get(actor.add.remote()) for _ in range(200)] == list(range(2, 202))
    events = wait_for_rows(_gcs(), _CALL_EVENTS, actor._actor_id, "add", count=201 * 3)
    by_call: dict[str, list[str]] = {}
    for row in events:
        by_call.setdefault(row["entity_id"], []).append(row["event_type"])
    assert len(by_call) == 201
    assert all(types == ["submitted", "running", "finished"] for types in by_call.values())
    assert list(_went_direct(actor, "add", 201).values()) == [False] + [True] * 200


def test_each_callers_order_holds_across_the_switch_and_with_a_second_caller() -> None:
    actor = Log.remote()
    first = [actor.record.remote("driver", i) for i in range(300)]  # no route yet
    ray.get(first[:1])
    # while the first are not all in these go through the daemon too, then switch
    more = [actor.record.remote("driver", i) for i in range(300, 600)]
    ray.get(first + more)
    rest = [actor.record.remote("driver", i) for i in range(600, 3000)]  # straight to it
    other = make_calls.remote(actor, "task", 1000)  # a worker calling it as well
    assert ray.get(other, timeout=60) == 1000
    ray.get(rest)
    seen = ray.get(actor.history.remote())
    assert [s for c, s in seen if c == "driver"] == list(range(3000))
    assert [s for c, s in seen if c == "task"] == list(range(1000))
    direct = _went_direct(actor, "record", 4000)
    assert not any(direct[ref.task_id().hex()] for ref in first)
    assert all(direct[ref.task_id().hex()] for ref in rest)


def test_ref_arguments_of_direct_calls_are_resolved_in_order() -> None:
    actor = Log.remote()
    assert ray.get(actor.add.remote(0)) == 0  # the route is there from now on
    put = ray.put(5)
    pending = later.remote(100, 0.5)
    refs = [actor.add.remote(put), actor.add.remote(pending), actor.add.remote(1)]
    assert ray.get(refs, timeout=60) == [5, 105, 106]  # the third waited for the second
    with pytest.raises(RayTaskError, match="no such key"):
        ray.get(actor.add.remote(broken.remote()), timeout=60)
    assert ray.get(actor.add.remote(1)) == 107  # the failed call did not run


def test_a_crash_resends_direct_calls_that_never_began_and_fails_the_one_running(
    tmp_path: Path,
) -> None:
    actor = Log.options(max_restarts=1).remote()
    pid = ray.get(actor.pid.remote())
    assert ray.get(actor.add.remote()) == 1  # direct from here on
    started = tmp_path / "started"
    running = actor.slow.remote(30, str(started))
    queued = [actor.add.remote() for _ in range(20)]
    deadline = time.monotonic() + 30
    while not started.exists():  # the slow call has begun; the rest wait behind it
        assert time.monotonic() < deadline, "the slow call never began"
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ActorUnavailableError, match="no retries left"):  # (it restarts)
        ray.get(running, timeout=60)
    assert ray.get(queued, timeout=60) == list(range(1, 21))  # on the new instance
    assert ray.get(actor.pid.remote()) != pid
    reasons = rows(
        _gcs(),
        "SELECT payload->>'reason' AS reason FROM events WHERE event_type = 'retried' "
        "AND entity_id = ANY($1::text[])",
        [ref.task_id().hex() for ref in queued],
    )
    assert len(reasons) == 20
    assert all("before the call began" in r["reason"] for r in reasons)
    ray.kill(actor)
    with pytest.raises(ActorDiedError):
        ray.get(actor.add.remote(), timeout=30)
    workers = _workers_of(actor)
    assert len(workers) == 2
    deadline = time.monotonic() + 30
    while left := [f for worker in workers for f in _files_of(worker)]:
        assert time.monotonic() < deadline, f"an actor's worker left {left}"
        time.sleep(0.1)


def test_actors_that_replay_their_calls_take_no_direct_calls() -> None:
    actor = Log.options(max_restarts=1, replay_calls_on_restart=True).remote()
    assert [ray.get(actor.add.remote()) for _ in range(20)] == list(range(1, 21))
    assert not any(_went_direct(actor, "add", 20).values())


def test_a_threaded_actor_runs_direct_calls_concurrently() -> None:
    @ray.remote(max_concurrency=4)
    class Meeting:
        def __init__(self) -> None:
            import threading

            self.barrier = threading.Barrier(4, timeout=20)

        def ping(self) -> int:
            return 1

        def meet(self) -> int:
            self.barrier.wait()  # only passes if 4 calls run at once
            return 1

    actor = Meeting.remote()
    assert ray.get(actor.ping.remote()) == 1  # direct from here on
    assert ray.get([actor.meet.remote() for _ in range(4)], timeout=60) == [1] * 4
    assert ray.get([actor.meet.remote() for _ in range(8)], timeout=60) == [1] * 8


def test_an_async_actor_overlaps_direct_calls() -> None:
    @ray.remote
    class Sleeper:
        async def nap(self, seconds: float) -> float:
            import asyncio

            await asyncio.sleep(seconds)
            return seconds

    actor = Sleeper.remote()
    assert ray.get(actor.nap.remote(0)) == 0
    start = time.monotonic()
    assert ray.get([actor.nap.remote(0.5) for _ in range(200)], timeout=60) == [0.5] * 200
    assert time.monotonic() - start < 20  # 200 x 0.5 s one after another would be 100 s


def test_the_actor_socket_is_owner_only() -> None:
    actor = Log.remote()
    ray.get(actor.add.remote())
    (worker,) = _workers_of(actor)
    sock, begun = _files_of(worker)
    assert sock.stat().st_mode & 0o777 == 0o600
    assert begun.stat().st_mode & 0o777 == 0o600


def test_direct_calls_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAIRN_DIRECT_ACTOR_CALLS", "0")
    actor = Log.remote()  # the first call to it from this process reads the setting
    assert [ray.get(actor.add.remote()) for _ in range(50)] == list(range(1, 51))
    assert not any(_went_direct(actor, "add", 50).values())


def test_an_answer_that_reaches_the_daemon_before_the_callers_copy_is_recorded() -> None:
    """The worker's TaskDone can reach the daemon before the caller's copy of the call
    (two sockets): the daemon keeps it until the copy comes, then records the call."""
    client = client_or_auto_init()
    actor = Log.remote()
    assert ray.get(actor.add.remote()) == 1  # the route is there from now on
    (worker_id,) = _workers_of(actor)
    spec = p.TaskSpec(
        task_id=uuid.uuid4().hex,
        job_id=client.welcome.job_id,
        name="Log.add",
        function_id="",
        args=[],
        kwargs={},
        num_returns=1,
        resources={},
        max_retries=0,
        retry_exceptions=False,
        actor_id=actor._actor_id,
        method="add",
    )
    client.expect_owned(spec.return_ids())
    call = p.SubmitDirectCall(spec, worker_id)
    to_worker = p.SyncChannel(direct_socket_path(client.welcome.session_dir, worker_id))
    try:
        to_worker.send(call)
        done = to_worker.receive()  # answered: the daemon has its TaskDone, no copy yet
    finally:
        to_worker.close()
    assert isinstance(done, p.TaskDone) and done.error is None
    # the worker tells the daemon of its calls in order, on one connection: once a later
    # call is recorded, the daemon has had this answer too, and kept it unrecorded
    later = actor.pid.remote()
    ray.get(later)
    wait_for_rows(
        _gcs(),
        "SELECT 1 FROM events WHERE entity_id = $1 AND event_type = 'finished'",
        later.task_id().hex(),
    )
    assert not rows(_gcs(), "SELECT 1 FROM events WHERE entity_id = $1", spec.task_id)
    client.send(call)  # the copy, late
    types = wait_for_rows(
        _gcs(),
        "SELECT event_type FROM events WHERE entity_id = $1 ORDER BY position",
        spec.task_id,
        count=3,
    )
    assert [r["event_type"] for r in types] == ["submitted", "running", "finished"]
    client._remember(done.returns)  # what the caller's reader does with an answer
    assert ray.get(ray.ObjectRef(spec.return_ids()[0])) == 2
    assert ray.get(actor.add.remote()) == 3  # the actor goes on as before


@ray.remote
def made_inside() -> list[ray.ObjectRef]:
    return [ray.put("inner")]


def test_push_objects_sends_a_result_the_daemon_would_not_push() -> None:
    """A caller whose direct route broke asks for the results it has not seen
    (PushObjects); the daemon pushes each once it is ready."""
    client = client_or_auto_init()
    (inner,) = ray.get(made_inside.remote())  # borrowed: never pushed to this process
    object_id = inner.hex()
    assert object_id not in client._local
    client.send(p.PushObjects([object_id]))
    deadline = time.monotonic() + 30
    while object_id not in client._local:
        assert time.monotonic() < deadline, "the daemon did not push the object"
        time.sleep(0.02)
    assert ray.get(inner) == "inner"
