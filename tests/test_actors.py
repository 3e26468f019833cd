"""Actors (the first part of issue 4): a dedicated worker per actor, ordered calls,
handles passed around, creation failure, kill and exit_actor, and their log."""

from __future__ import annotations

import time
from pathlib import Path

import asyncpg
import pytest
from log_rows import wait_for_rows

import sdk as ray
from controlplane.projections import Projector
from sdk.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("private_cluster")]


@ray.remote
class Recorder:
    def __init__(self, start: int = 0) -> None:
        self.n = start
        self.calls: list[tuple[str, int]] = []

    def add(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def record(self, caller: str, seq: int) -> None:
        self.calls.append((caller, seq))

    def history(self) -> list[tuple[str, int]]:
        return self.calls

    @ray.method(num_returns=2)
    def pair(self) -> tuple[int, int]:
        return self.n, -self.n

    def leave(self) -> None:
        ray.actor.exit_actor()

    def slow(self, seconds: float, started: str = "") -> int:
        if started:  # tells the test it has begun
            Path(started).touch()
        time.sleep(seconds)
        return self.n


def _until_begun(started: Path) -> None:
    """Until the slow call has begun in the actor (marked begun before it runs: see
    dataplane/begun_calls.py); the calls after it wait behind it."""
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline, "the slow call never began"
        time.sleep(0.02)


def test_ten_thousand_calls_from_one_caller_run_in_order() -> None:
    actor = Recorder.remote()
    results = ray.get([actor.add.remote() for _ in range(10_000)])
    assert results == list(range(1, 10_001))


def test_two_callers_interleave_but_each_keeps_its_order() -> None:
    actor = Recorder.remote()

    @ray.remote
    def caller(handle: object, name: str, n: int) -> None:
        ray.get([handle.record.remote(name, i) for i in range(n)])  # type: ignore[attr-defined]

    remote_caller = caller.remote(actor, "task", 300)
    local = [actor.record.remote("driver", i) for i in range(300)]
    ray.get([remote_caller, *local])
    history = ray.get(actor.history.remote())
    for name in ("driver", "task"):
        assert [seq for who, seq in history if who == name] == list(range(300))


def test_constructor_arguments_refs_and_num_returns() -> None:
    actor = Recorder.remote(ray.put(40))
    assert ray.get(actor.add.remote(ray.put(2))) == 42
    first, second = actor.pair.remote()
    assert ray.get([first, second]) == [42, -42]


def test_a_failing_constructor_fails_every_call_with_the_cause() -> None:
    @ray.remote
    class Broken:
        def __init__(self) -> None:
            raise ValueError("no config file")

        def f(self) -> int:
            return 1

    broken = Broken.remote()
    for _ in range(2):
        with pytest.raises(RayActorError, match="no config file"):
            ray.get(broken.f.remote(), timeout=30)


def test_kill_fails_pending_and_later_calls_without_hanging(tmp_path: Path) -> None:
    actor = Recorder.remote()
    assert ray.get(actor.add.remote()) == 1
    started = tmp_path / "started"
    running = actor.slow.remote(30, str(started))
    queued = actor.add.remote()
    _until_begun(started)
    ray.kill(actor)
    for ref in (running, queued, actor.add.remote()):
        with pytest.raises(ActorDiedError, match="killed"):
            ray.get(ref, timeout=30)


def test_exit_actor_ends_it() -> None:
    actor = Recorder.remote()
    assert ray.get(actor.add.remote()) == 1
    with pytest.raises(ActorDiedError, match="exit_actor"):
        ray.get(actor.leave.remote(), timeout=30)
    with pytest.raises(ActorDiedError):
        ray.get(actor.add.remote(), timeout=30)


def test_misuse_gives_clear_errors() -> None:
    with pytest.raises(TypeError, match=r"use '.*Recorder\.remote\(\)'"):
        Recorder()
    actor = Recorder.remote()
    with pytest.raises(AttributeError, match="no method 'missing'"):
        actor.missing.remote()
    with pytest.raises(ValueError, match="must be >= 1"):
        Recorder.options(max_concurrency=0)
    with pytest.raises(ValueError, match="'detached' or 'non_detached'"):
        Recorder.options(lifetime="forever")
    with pytest.raises(ValueError, match="only supported for actors"):
        ray.kill(ray.put(1))  # type: ignore[arg-type]


async def test_the_log_holds_the_actor_life_and_every_call() -> None:
    actor = Recorder.remote()
    refs = [actor.add.remote() for _ in range(5)]
    ray.get(refs)
    ray.kill(actor)
    with pytest.raises(ActorDiedError):
        ray.get(actor.add.remote(), timeout=30)
    url = ray.get_runtime_context().gcs_address
    conn = await asyncpg.connect(url)
    try:
        actor_id = await conn.fetchval(
            "SELECT payload->>'actor_id' FROM events WHERE entity_id = $1"
            " AND event_type = 'submitted'",
            refs[0].task_id().hex(),
        )
        life = await conn.fetch(
            "SELECT event_type, payload FROM events WHERE entity_kind = 'actor' "
            "AND entity_id = $1 ORDER BY position",
            actor_id,
        )
        assert [r["event_type"] for r in life] == [
            "creation_requested",
            "scheduled",
            "alive",
            "dead",
        ]
        calls = await conn.fetch(
            "SELECT (payload->>'sequence')::int AS seq FROM events WHERE event_type = 'submitted'"
            " AND payload->>'actor_id' = $1 AND payload->>'method' = 'add' ORDER BY position",
            actor_id,
        )
        assert [r["seq"] for r in calls] == list(range(6))
        async with Projector(url) as projector:
            await projector.catch_up()
        row = await conn.fetchrow("SELECT * FROM actors WHERE actor_id = $1", actor_id)
        assert row["state"] == "DEAD" and "killed" in row["death_cause"]
        assert row["class_name"].endswith("Recorder")
    finally:
        await conn.close()


def test_named_actors_and_namespaces() -> None:
    counter = Recorder.options(name="counter").remote()
    assert ray.get(counter.add.remote()) == 1
    assert ray.get(ray.get_actor("counter").add.remote()) == 2
    with pytest.raises(ValueError, match="already taken"):
        Recorder.options(name="counter").remote()
    same = Recorder.options(name="counter", get_if_exists=True).remote()
    assert ray.get(same.add.remote()) == 3
    with pytest.raises(ValueError, match="Failed to look up actor with name 'nobody'"):
        ray.get_actor("nobody")

    @ray.remote
    def lookup() -> int:
        return ray.get(ray.get_actor("counter").add.remote())

    assert ray.get(lookup.remote()) == 4  # tasks of the job see its namespace

    other = Recorder.options(name="counter", namespace="elsewhere").remote(100)
    assert ray.get(ray.get_actor("counter", namespace="elsewhere").add.remote()) == 101
    assert ray.get(ray.get_actor("counter").add.remote()) == 5
    ray.kill(counter)
    with pytest.raises(ActorDiedError):
        ray.get(counter.add.remote(), timeout=30)
    with pytest.raises(ValueError, match="Failed to look up"):
        ray.get_actor("counter")
    assert ray.get(Recorder.options(name="counter").remote(7).add.remote()) == 8
    ray.kill(other)


def test_actors_die_with_their_owner_unless_detached() -> None:
    import os
    import signal

    @ray.remote(max_retries=0)
    def make_actors() -> int:
        Recorder.options(name="owned").remote()
        Recorder.options(name="kept", lifetime="detached").remote()
        return os.getpid()

    owner_pid = ray.get(make_actors.remote())
    owned, kept = ray.get_actor("owned"), ray.get_actor("kept")
    assert ray.get([owned.add.remote(), kept.add.remote()]) == [1, 1]
    os.kill(owner_pid, signal.SIGKILL)  # the worker that created both
    deadline = time.monotonic() + 10  # its death reaches the daemon asynchronously
    while time.monotonic() < deadline:
        try:
            ray.get_actor("owned")
        except ValueError:
            break
        time.sleep(0.05)
    with pytest.raises(ActorDiedError, match="owner exited"):
        ray.get(owned.add.remote(), timeout=30)
    assert ray.get(kept.add.remote(), timeout=30) == 2
    ray.kill(kept)
    assert ray.get(make_actors.remote()) != owner_pid  # the pool replaced the killed worker


def test_actor_pool_map_submit_and_get() -> None:
    @ray.remote
    class Doubler:
        def double(self, x: int) -> int:
            if x == 3:
                time.sleep(0.5)  # finishes last
            return 2 * x

    pool = ray.util.ActorPool([Doubler.remote(), Doubler.remote()])
    assert list(pool.map(lambda a, v: a.double.remote(v), range(6))) == [0, 2, 4, 6, 8, 10]
    unordered = list(pool.map_unordered(lambda a, v: a.double.remote(v), range(6)))
    assert sorted(unordered) == [0, 2, 4, 6, 8, 10] and unordered[-1] == 6
    pool.submit(lambda a, v: a.double.remote(v), 1)
    pool.submit(lambda a, v: a.double.remote(v), 2)
    assert not pool.has_free()
    pool.submit(lambda a, v: a.double.remote(v), 3)  # waits for a free actor
    assert [pool.get_next(), pool.get_next()] == [2, 4]
    with pytest.raises(TimeoutError):
        pool.get_next(timeout=0.05)
    assert pool.get_next() == 6 and not pool.has_next()
    idle = pool.pop_idle()
    assert idle is not None and pool.has_free()  # one of the two left
    pool.push(idle)
    with pytest.raises(ValueError, match="already belongs"):
        pool.push(idle)
    with pytest.raises(StopIteration):
        pool.get_next()


@ray.remote(max_restarts=1, max_task_retries=-1)
class Resettable:
    def __init__(self) -> None:
        self.n = 0

    def pid(self) -> int:
        import os

        return os.getpid()

    def add(self) -> int:
        time.sleep(0.01)
        self.n += 1
        return self.n

    def add_to(self, value: int) -> int:
        self.n += 1
        return value + self.n

    def leave(self) -> None:
        ray.actor.exit_actor()


async def test_restart_loses_no_queued_call_and_resets_state_once() -> None:
    import os
    import signal

    actor = Resettable.remote()
    pid = ray.get(actor.pid.remote())
    refs = [actor.add.remote() for _ in range(100)]
    assert ray.get(refs[:10], timeout=60) == list(range(1, 11))  # run on the first instance
    os.kill(pid, signal.SIGKILL)
    results = ray.get(refs, timeout=60)
    assert len(results) == 100
    resets = [i for i in range(1, 100) if results[i] != results[i - 1] + 1]
    assert len(resets) == 1 and results[resets[0]] == 1  # one reset to the constructor state
    assert resets[0] >= 10  # after the calls that had run before the kill
    assert results[-1] == 100 - resets[0]
    assert ray.get(actor.pid.remote()) != pid
    ray.kill(actor, no_restart=False)  # the second crash: max_restarts is spent
    with pytest.raises(ActorDiedError, match="exit code"):
        ray.get(actor.add.remote(), timeout=30)
    conn = await asyncpg.connect(ray.get_runtime_context().gcs_address)
    try:
        life = await conn.fetch(
            "SELECT event_type FROM events WHERE entity_kind = 'actor' AND entity_id = $1 "
            "ORDER BY position",
            actor._actor_id,
        )
    finally:
        await conn.close()
    assert [r["event_type"] for r in life] == [
        "creation_requested",
        "scheduled",
        "alive",
        "restarting",
        "scheduled",
        "alive",
        "dead",
    ]


@ray.remote
def _later(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def test_calls_waiting_for_arguments_run_after_a_restart() -> None:
    """Calls sent straight to the actor's worker whose argument was not ready yet when
    the daemon recorded them, interrupted by the worker's death: the new instance runs
    them once the argument is ready (a chaos run saw them wait for ever, the daemon
    holding them behind an argument it had never been asked to watch)."""
    import os
    import signal

    actor = Resettable.remote()
    pid = ray.get(actor.pid.remote())
    argument = _later.remote(3.0, 7)
    refs = [actor.add_to.remote(argument) for _ in range(5)]
    wait_for_rows(  # the daemon recorded the calls (their argument is still pending)
        ray.get_runtime_context().gcs_address,
        "SELECT 1 FROM events WHERE entity_id = ANY($1::text[]) AND event_type = 'submitted'",
        [r.task_id().hex() for r in refs],
        count=5,
    )
    assert ray.wait([argument], timeout=0)[1] == [argument]
    os.kill(pid, signal.SIGKILL)
    assert ray.get(refs, timeout=60) == [8, 9, 10, 11, 12]
    assert ray.get(actor.pid.remote()) != pid


def test_a_call_interrupted_without_task_retries_fails(tmp_path: Path) -> None:
    actor = Recorder.options(max_restarts=1).remote()
    assert ray.get(actor.add.remote()) == 1  # alive
    started = tmp_path / "started"
    running = actor.slow.remote(30, str(started))
    queued = actor.add.remote()
    _until_begun(started)
    ray.kill(actor, no_restart=False)
    with pytest.raises(ActorUnavailableError, match="no retries left"):  # (it restarts)
        ray.get(running, timeout=30)
    assert ray.get(queued, timeout=30) == 1  # queued calls run on the new instance


def test_threaded_actor_runs_calls_concurrently() -> None:
    @ray.remote(max_concurrency=4)
    class Meeting:
        def __init__(self) -> None:
            import threading

            self.barrier = threading.Barrier(4, timeout=20)

        def meet(self) -> str | None:
            self.barrier.wait()  # only passes if 4 calls run at once
            return ray.get_runtime_context().get_task_id()

    actor = Meeting.remote()
    refs = [actor.meet.remote() for _ in range(4)]
    assert ray.get(refs, timeout=60) == [ref.task_id().hex() for ref in refs]


def test_async_actor_interleaves_calls_and_awaits_refs() -> None:
    @ray.remote
    class Gathering:
        def __init__(self) -> None:
            self.arrived = 0

        async def meet(self, n: int) -> int:
            import asyncio

            self.arrived += 1
            deadline = asyncio.get_running_loop().time() + 20
            while self.arrived < n:  # only ends if n calls are in flight together
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            return self.arrived

        async def fetch(self, refs: list[object]) -> object:
            return await refs[0]  # type: ignore[misc]

    actor = Gathering.remote()
    assert ray.get([actor.meet.remote(50) for _ in range(50)], timeout=60) == [50] * 50
    value = ray.put(21)
    assert ray.get(actor.fetch.remote([value]), timeout=30) == 21


def test_queue_shared_by_tasks_with_empty_and_full() -> None:
    from sdk.util.queue import Empty, Full, Queue

    q = Queue(maxsize=3)
    assert q.empty() and not q.full()

    @ray.remote
    def produce(queue: Queue, n: int) -> None:
        for i in range(n):
            queue.put(i)  # blocks while full

    producer = produce.remote(q, 10)
    got = [q.get(timeout=30) for _ in range(10)]
    ray.get(producer)
    assert got == list(range(10))
    with pytest.raises(Empty):
        q.get(timeout=0.1)
    with pytest.raises(Empty):
        q.get_nowait()
    q.put_nowait_batch([1, 2, 3])
    assert q.full() and q.qsize() == 3
    with pytest.raises(Full):
        q.put(4, timeout=0.1)
    with pytest.raises(Full):
        q.put_nowait(4)
    assert q.get_nowait_batch(3) == [1, 2, 3]
    q.shutdown()


def test_an_actor_that_calls_exit_actor_is_not_restarted() -> None:
    actor = Resettable.options(max_restarts=5).remote()
    assert ray.get(actor.add.remote()) == 1
    with pytest.raises(ActorDiedError, match="exit_actor"):
        ray.get(actor.leave.remote(), timeout=30)
    with pytest.raises(ActorDiedError, match="exit_actor"):
        ray.get(actor.add.remote(), timeout=30)


def test_a_thousand_async_sleeps_overlap() -> None:
    @ray.remote
    class Napper:
        async def nap(self) -> float:
            import asyncio

            await asyncio.sleep(0.1)
            return 0.1

    actor = Napper.remote()
    ray.get(actor.nap.remote())
    started = time.monotonic()
    assert sum(ray.get([actor.nap.remote() for _ in range(1000)], timeout=60)) == pytest.approx(100)
    # run one after another they would take 100 s; overlapping, a few seconds
    assert time.monotonic() - started < 30


@ray.remote
class Ledger:
    def __init__(self) -> None:
        self.entries: list[object] = []

    def record(self, entry: object) -> int:
        self.entries.append(entry)
        return len(self.entries)

    def fail(self) -> None:
        self.entries.append("before the error")
        raise ValueError("recorded, then raised")

    def all(self) -> list[object]:
        return self.entries


async def test_replay_calls_on_restart_rebuilds_the_state_from_the_log() -> None:
    ledger = Ledger.options(
        max_restarts=2, max_task_retries=-1, replay_calls_on_restart=True
    ).remote()
    big = ray.put(list(range(50_000)))  # a ref argument, still held: replayable
    assert ray.get([ledger.record.remote(n) for n in range(5)]) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        ray.get(ledger.fail.remote())
    assert ray.get(ledger.record.remote(big)) == 7
    before = ray.get(ledger.all.remote())
    ray.kill(ledger, no_restart=False)  # as a crash: a new instance, calls replayed
    after = ray.get(ledger.all.remote(), timeout=60)
    assert after == before  # not the constructor's empty state
    assert ray.get(ledger.record.remote("next"), timeout=30) == 8

    conn = await asyncpg.connect(ray.get_runtime_context().gcs_address)
    try:
        row = await conn.fetchrow(
            "SELECT payload FROM events WHERE entity_id = $1 AND event_type = 'replaying'",
            ledger._actor_id,
        )
        calls = await conn.fetch(
            "SELECT entity_id FROM events WHERE event_type = 'submitted' "
            "AND payload->>'actor_id' = $1 AND payload->>'method' <> '__init__' "
            "ORDER BY position",
            ledger._actor_id,
        )
    finally:
        await conn.close()
    import json

    replayed = json.loads(row["payload"])["calls"]
    ran_before = [r["entity_id"] for r in calls][:8]  # 5 records, fail, record, all
    assert replayed == ran_before  # exactly those, in order

    plain = Resettable.options(max_restarts=1).remote()  # without the option: reset
    assert ray.get(plain.add.remote()) == 1
    ray.kill(plain, no_restart=False)
    assert ray.get(plain.add.remote(), timeout=60) == 1
    with pytest.raises(ValueError, match="max_concurrency=1"):
        Ledger.options(replay_calls_on_restart=True, max_concurrency=4).remote()


@ray.remote
class Saving:
    def __init__(self) -> None:
        self.total = 0
        self.loaded_from: int | None = None

    def add(self, n: int) -> int:
        self.total += n
        return self.total

    def state(self) -> tuple[int, int | None]:
        return self.total, self.loaded_from

    def __cairn_save__(self) -> int:
        return self.total

    def __cairn_load__(self, total: int) -> None:
        self.total = self.loaded_from = total


async def test_a_checkpoint_bounds_the_replay() -> None:
    actor = Saving.options(
        max_restarts=1, max_task_retries=-1, replay_calls_on_restart=True, checkpoint_interval=10
    ).remote()
    for n in range(25):  # one at a time: each checkpoint comes right after its 10th call
        assert ray.get(actor.add.remote(1)) == n + 1
    ray.kill(actor, no_restart=False)
    total, loaded_from = ray.get(actor.state.remote(), timeout=60)
    assert total == 25 and loaded_from == 20  # the checkpoint after 20 calls, then 5 replayed

    import json

    conn = await asyncpg.connect(ray.get_runtime_context().gcs_address)
    try:
        rows = await conn.fetch(
            "SELECT event_type, payload FROM events WHERE entity_id = $1 "
            "AND event_type IN ('checkpointed', 'replaying') ORDER BY position",
            actor._actor_id,
        )
    finally:
        await conn.close()
    assert [r["event_type"] for r in rows] == ["checkpointed", "checkpointed", "replaying"]
    assert len(json.loads(rows[-1]["payload"])["calls"]) == 5
    with pytest.raises(ValueError, match="__cairn_save__"):
        Ledger.options(replay_calls_on_restart=True, checkpoint_interval=5).remote()
