"""Generators (issue 18): ``num_returns="streaming"`` gives an ObjectRefGenerator whose
refs come as the values are yielded, as Ray's documentation shows: sync and async
iteration, ``next()``, an exception raised at the failing yield, on tasks and on sync
and async actor methods; every yielded value is a ``created`` event in the log.
Real node daemon, workers and PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import pytest
from log_rows import wait_for_rows
from ray_session import private_cluster
from store_objects import flip

import sdk as ray
from dataplane import protocol as p
from sdk.exceptions import (
    RayTaskError,
    StreamingGeneratorReplayInconsistentError,
    TaskCancelledError,
)

pytestmark = pytest.mark.timeout(120)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    yield from private_cluster(num_cpus=2)


@ray.remote(num_returns="streaming")
def count_to(n: int, marker: str = "") -> Iterator[int]:
    for i in range(n):
        if marker:
            Path(marker).write_text(str(i))
        yield i


@ray.remote(num_returns="streaming")
def slowly(release: str) -> Iterator[str]:
    yield "first"
    while not Path(release).exists():
        time.sleep(0.02)
    yield "second"


@ray.remote(num_returns="streaming")
def fails_at(k: int) -> Iterator[int]:
    yield from range(k)
    raise ValueError(f"no value {k}")


def test_a_generator_task_streams_its_values_in_order() -> None:
    gen = count_to.remote(5)
    assert [ray.get(ref) for ref in gen] == [0, 1, 2, 3, 4]
    assert gen.is_finished()
    with pytest.raises(StopIteration):
        next(gen)


def test_each_value_is_ready_as_soon_as_it_is_yielded(tmp_path: Path) -> None:
    release = tmp_path / "release"
    gen = slowly.remote(str(release))
    first = next(gen)  # while the generator still waits to yield the second
    assert ray.get(first, timeout=30) == "first"
    ready, _ = ray.wait([first], timeout=0)
    assert ready == [first]
    release.write_text("go")
    assert ray.get(next(gen), timeout=30) == "second"
    assert list(gen) == []


def test_an_exception_is_raised_at_the_failing_yield() -> None:
    gen = fails_at.remote(2)
    refs = list(gen)
    assert len(refs) == 3  # two values, then the error, then the end
    assert ray.get(refs[:2]) == [0, 1]
    with pytest.raises(RayTaskError, match="no value 2") as failed:
        ray.get(refs[2])
    assert isinstance(failed.value.cause, ValueError) or "ValueError" in str(failed.value)


def test_async_iteration_of_a_generator() -> None:
    async def consume() -> list[int]:
        return [await ref async for ref in count_to.remote(3)]

    assert asyncio.run(consume()) == [0, 1, 2]


def test_every_yielded_value_is_a_created_event_of_its_task() -> None:
    gen = count_to.remote(3)
    refs = list(gen)
    rows = wait_for_rows(
        ray.get_runtime_context().gcs_address,
        "SELECT entity_id, payload->>'task_id' AS task_id FROM events "
        "WHERE event_type = 'created' AND entity_id = ANY($1) ORDER BY position",
        [r.hex() for r in refs],
        count=3,
    )
    assert [row["entity_id"] for row in rows] == [r.hex() for r in refs]
    assert {row["task_id"] for row in rows} == {gen.task_id()}


@ray.remote
class Streamer:
    @ray.method(num_returns="streaming")
    def values(self, n: int) -> Iterator[int]:
        yield from range(n)

    def ping(self) -> str:
        return "pong"


@ray.remote
class AsyncStreamer:
    @ray.method(num_returns="streaming")
    async def values(self, n: int):
        for i in range(n):
            await asyncio.sleep(0)
            yield i * 10


def test_actor_methods_stream_sync_and_async() -> None:
    streamer = Streamer.remote()
    assert [ray.get(r) for r in streamer.values.remote(4)] == [0, 1, 2, 3]
    assert ray.get(streamer.ping.remote()) == "pong"  # calls after it keep their order
    options = streamer.values.options(num_returns="streaming")
    assert [ray.get(r) for r in options.remote(2)] == [0, 1]
    assert [ray.get(r) for r in AsyncStreamer.remote().values.remote(3)] == [0, 10, 20]


@ray.remote(num_returns="streaming")
def big_values(n: int) -> Iterator[bytes]:
    for i in range(n):
        yield bytes([i]) * 1_000_000  # in the store, not inline


def test_a_dropped_generator_lets_its_values_go() -> None:
    gen = big_values.remote(3)
    first = next(gen)
    assert ray.get(first)[:1] == b"\x00"
    task_id = gen.task_id()
    del gen  # values 1 and 2 (made or to come) are not held for this driver any more
    others = [p.return_object_id(task_id, i) for i in (1, 2)]
    wait_for_rows(
        ray.get_runtime_context().gcs_address,
        "SELECT entity_id FROM events WHERE event_type = 'freed' AND entity_id = ANY($1)",
        others,
        count=2,
    )
    assert ray.get(first)[:1] == b"\x00"  # the one taken stays


def test_wait_over_generators_and_refs(tmp_path: Path) -> None:
    release = tmp_path / "release"
    waiting = slowly.remote(str(release))
    assert ray.get(next(waiting), timeout=30) == "first"
    done = count_to.remote(1)
    ready, not_ready = ray.wait([waiting, done], num_returns=1, timeout=30)
    assert ready == [done] and not_ready == [waiting]  # its next value is not made yet
    release.write_text("go")
    ready, _ = ray.wait([waiting], timeout=30)
    assert ready == [waiting] and ray.get(next(waiting)) == "second"


def test_cancel_of_a_running_generator(tmp_path: Path) -> None:
    gen = slowly.remote(str(tmp_path / "never"))
    assert ray.get(next(gen), timeout=30) == "first"
    ray.cancel(gen)
    rest = list(gen)
    assert len(rest) == 1  # the cancellation, as its next value
    with pytest.raises(TaskCancelledError):
        ray.get(rest[0], timeout=30)


@ray.remote(num_returns=3)
def three() -> Iterator[int]:
    yield from (1, 2, 3)


@ray.remote
def yields_then_raises(n: int) -> Iterator[int]:
    yield from range(n)
    raise ValueError("error after the values")


def test_a_generator_with_an_int_num_returns_fills_that_many_refs() -> None:
    assert ray.get(three.remote()) == [1, 2, 3]
    assert ray.get(yields_then_raises.options(num_returns=1).remote(1)) == 0


def test_int_num_returns_keeps_the_values_yielded_before_an_error() -> None:
    """Ray's example: the refs of the values made keep them, the others raise."""
    ref1, ref2, ref3, ref4 = yields_then_raises.options(num_returns=4).remote(2)
    assert ray.get([ref1, ref2]) == [0, 1]
    for ref in (ref3, ref4):
        with pytest.raises(RayTaskError, match="error after the values"):
            ray.get(ref)


@ray.remote
def yields(n: int) -> Iterator[int]:
    yield from range(n)


def test_int_num_returns_with_a_different_count_of_values_is_an_error() -> None:
    first, second, third = yields.options(num_returns=3).remote(2)  # too few
    assert ray.get([first, second]) == [0, 1]
    with pytest.raises(RayTaskError, match=r"declared num_returns=3 but its generator yielded 2"):
        ray.get(third)
    # too many: Ray keeps the values declared and only logs the error (ray#28689)
    assert ray.get(yields.options(num_returns=2).remote(3)) == [0, 1]


@ray.remote(num_returns="dynamic")
def split(values: list[int], chunk: int) -> Iterator[list[int]]:
    while values:
        yield values[:chunk]
        values = values[chunk:]


@ray.remote
def total(generator: ray.DynamicObjectRefGenerator) -> int:
    assert isinstance(generator, ray.DynamicObjectRefGenerator)
    return sum(sum(ray.get(ref)) for ref in generator)


def test_a_dynamic_generator_gives_one_ref_to_its_refs() -> None:
    """Ray's example: one ref, whose value iterates over the refs of the values."""
    dynamic_ref = split.remote(list(range(10)), 3)
    assert isinstance(dynamic_ref, ray.ObjectRef)
    generator = ray.get(dynamic_ref)
    assert isinstance(generator, ray.DynamicObjectRefGenerator)
    refs = list(generator)
    assert len(refs) == len(generator) == 4
    assert ray.get(refs) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    # as a task argument: its ref, or the generator itself
    assert ray.get(total.remote(dynamic_ref)) == 45
    assert ray.get(total.remote(generator)) == 45


def test_a_dynamic_generator_stores_its_error_as_its_last_ref() -> None:
    generator = ray.get(yields_then_raises.options(num_returns="dynamic").remote(2))
    ref1, ref2, ref3 = generator
    assert ray.get([ref1, ref2]) == [0, 1]
    with pytest.raises(RayTaskError, match="error after the values"):
        ray.get(ref3)


def test_a_dynamic_generators_values_live_as_long_as_it() -> None:
    """Its values are refs inside its value: held while it (or its ref) is, freed with
    it; each is a created event of its task (its lineage)."""
    dynamic_ref = split.remote(list(range(4)), 2)
    generator = ray.get(dynamic_ref)
    ids = [ref.hex() for ref in generator]
    gcs = ray.get_runtime_context().gcs_address
    rows = wait_for_rows(
        gcs,
        "SELECT entity_id, payload->>'task_id' AS task_id FROM events "
        "WHERE event_type = 'created' AND entity_id = ANY($1)",
        ids,
        count=2,
    )
    assert {row["task_id"] for row in rows} == {dynamic_ref.task_id().hex()}
    del dynamic_ref  # the generator (a value here) still holds its refs
    assert [ray.get(ref) for ref in generator] == [[0, 1], [2, 3]]
    del generator
    wait_for_rows(
        gcs,
        "SELECT entity_id FROM events WHERE event_type = 'freed' AND entity_id = ANY($1)",
        ids,
        count=2,
    )


@ray.remote
class Splitter:
    @ray.method(num_returns="dynamic")
    def parts(self, n: int) -> Iterator[int]:
        yield from range(n)


def test_an_actor_method_may_be_a_dynamic_generator() -> None:
    splitter = Splitter.remote()
    assert ray.get(list(ray.get(splitter.parts.remote(3)))) == [0, 1, 2]
    dynamic = splitter.parts.options(num_returns="dynamic").remote(2)
    assert ray.get(list(ray.get(dynamic))) == [0, 1]


def test_num_returns_refuses_other_strings() -> None:
    with pytest.raises(ValueError, match="'streaming' or 'dynamic'"):
        ray.remote(num_returns="lazy")(lambda: (yield 1))


def _until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, "not reached in 30 s"
        time.sleep(0.02)


def _held_back_at(marker: Path, made: int) -> None:
    """The generator made ``made`` values (its marker names the last) and, while the
    caller holds back for a while, makes no more."""
    _until(lambda: marker.exists() and marker.read_text() == str(made - 1))
    time.sleep(1.0)
    assert marker.read_text() == str(made - 1)


def test_backpressure_pauses_a_generator_until_its_values_are_taken(tmp_path: Path) -> None:
    marker = tmp_path / "made"
    gen = count_to.options(_generator_backpressure_num_objects=2).remote(6, str(marker))
    _held_back_at(marker, 2)  # two values wait for the caller: it pauses
    assert ray.get(next(gen)) == 0
    _held_back_at(marker, 3)  # one taken, one more made
    assert [ray.get(ref) for ref in gen] == [1, 2, 3, 4, 5]


@ray.remote
class Producer:
    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=1)
    def one_at_a_time(self, n: int, marker: str) -> Iterator[int]:
        for i in range(n):
            Path(marker).write_text(str(i))
            yield i

    @ray.method(num_returns="streaming")
    def unbounded(self, n: int, marker: str) -> Iterator[int]:
        yield from self.one_at_a_time(n, marker)


@ray.remote
class AsyncProducer:
    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=1)
    async def one_at_a_time(self, n: int, marker: str):
        for i in range(n):
            Path(marker).write_text(str(i))
            yield i

    async def ping(self) -> str:
        return "pong"


def test_backpressure_of_actor_methods_sync_and_async(tmp_path: Path) -> None:
    producer = Producer.remote()
    first, second = tmp_path / "first", tmp_path / "second"
    gen = producer.one_at_a_time.remote(3, str(first))
    _held_back_at(first, 1)
    assert [ray.get(ref) for ref in gen] == [0, 1, 2]
    method = producer.unbounded.options(_generator_backpressure_num_objects=2)
    gen = method.remote(4, str(second))
    _held_back_at(second, 2)
    assert [ray.get(ref) for ref in gen] == [0, 1, 2, 3]

    actor = AsyncProducer.remote()
    marker = tmp_path / "async"
    gen = actor.one_at_a_time.remote(3, str(marker))
    _held_back_at(marker, 1)
    assert ray.get(actor.ping.remote()) == "pong"  # its loop goes on while it waits
    assert [ray.get(ref) for ref in gen] == [0, 1, 2]


def test_backpressure_option_is_checked() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        count_to.options(_generator_backpressure_num_objects=0)
    with pytest.raises(ValueError, match="streaming generators only"):
        three.options(_generator_backpressure_num_objects=2).remote()
    with pytest.raises(ValueError, match="streaming generators only"):
        ray.method(num_returns=2, _generator_backpressure_num_objects=2)
    assert [
        ray.get(r) for r in count_to.options(_generator_backpressure_num_objects=-1).remote(2)
    ] == [0, 1]


@ray.remote(num_returns="streaming")
def counted_runs(n: int, runs: str, fewer_next_time: bool = False) -> Iterator[bytes]:
    with open(runs, "a") as log:
        log.write("run\n")
    if fewer_next_time and Path(runs).read_text().count("run") > 1:
        n = 1
    for i in range(n):
        yield bytes([i]) * 1_000_000  # in the store


def test_a_lost_streamed_value_is_rebuilt_by_running_its_generator_again(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    refs = list(counted_runs.remote(3, str(runs)))
    assert ray.get(refs[1])[:1] == b"\x01"
    flip(refs[1], 0, 16, mask=0xFF)  # its bytes damaged: lost
    assert ray.get(refs[1], timeout=60) == b"\x01" * 1_000_000
    assert runs.read_text().count("run") == 2  # the generator ran again
    assert [ray.get(r)[:1] for r in (refs[0], refs[2])] == [b"\x00", b"\x02"]
    gcs = ray.get_runtime_context().gcs_address
    task_id = refs[1].task_id().hex()
    rebuilt = wait_for_rows(
        gcs,
        "SELECT payload->>'object_id' AS object_id FROM events "
        "WHERE event_type = 'reconstructing' AND entity_id = $1",
        task_id,
        count=1,
    )
    assert rebuilt[0]["object_id"] == refs[1].hex()
    created = wait_for_rows(
        gcs,
        "SELECT entity_id FROM events WHERE event_type = 'created' AND payload->>'task_id' = $1",
        task_id,
        count=4,
    )  # matched by index: only the lost value is made again
    assert sorted(row["entity_id"] for row in created) == sorted(
        [refs[0].hex(), refs[1].hex(), refs[1].hex(), refs[2].hex()]
    )


def test_a_rebuild_that_yields_fewer_values_is_inconsistent(tmp_path: Path) -> None:
    refs = list(counted_runs.remote(3, str(tmp_path / "runs"), fewer_next_time=True))
    flip(refs[2], 0, 16, mask=0xFF)
    with pytest.raises(StreamingGeneratorReplayInconsistentError, match="only 1 values"):
        ray.get(refs[2], timeout=60)
