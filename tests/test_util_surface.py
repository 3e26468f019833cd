"""``sdk.util`` beyond actors and placement groups (issue 18), as Ray's documentation
shows it: ``as_completed``, ``map_unordered`` (with backpressure), ``get_node_ip_address``,
``register_serializer`` / ``deregister_serializer`` and ``inspect_serializability``.
Real node daemon, workers and PostgreSQL."""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from ray_session import private_cluster

import sdk as ray
from sdk.util import (
    as_completed,
    deregister_serializer,
    get_node_ip_address,
    inspect_serializability,
    map_unordered,
    register_serializer,
)

pytestmark = pytest.mark.timeout(120)
# its plain helpers (functions, classes) travel by value: workers cannot import tests/
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    yield from private_cluster(num_cpus=2)


@ray.remote
def after(release: str, value: int) -> int:
    """``value``, once ``release`` exists ("" : at once)."""
    while release and not Path(release).exists():
        time.sleep(0.02)
    return value


def test_as_completed_yields_each_chunk_as_it_is_ready(tmp_path: Path) -> None:
    release = tmp_path / "release"
    refs = [after.remote(str(release), 1), after.remote("", 2), after.remote("", 3)]
    completed = as_completed(refs, chunk_size=1)
    first_two = {next(completed), next(completed)}  # while the first still waits
    assert first_two == {2, 3}
    release.write_text("go")
    assert list(completed) == [1]
    assert set(as_completed(refs, chunk_size=2, yield_obj_refs=True)) == set(refs)


@ray.remote
def square_it(item: int) -> int:
    return item * item


class _Counting:
    """``square_it``, counting the tasks map_unordered submits (here, in the driver)."""

    def __init__(self) -> None:
        self.submitted = 0

    def remote(self, item: int) -> ray.ObjectRef:
        self.submitted += 1
        return square_it.remote(item)


def test_map_unordered_keeps_at_most_backpressure_size_tasks_in_flight() -> None:
    counting, seen = _Counting(), []
    for value in map_unordered(counting, range(10), backpressure_size=3, chunk_size=1):
        seen.append(value)
        # when the k-th result arrives, at most k + 3 tasks have been submitted
        assert counting.submitted <= len(seen) + 3
    assert sorted(seen) == [i * i for i in range(10)] and counting.submitted == 10
    with pytest.raises(ValueError, match="chunk_size"):
        next(map_unordered(square_it, [1], chunk_size=0))


def test_the_node_ip_address() -> None:
    assert get_node_ip_address() == "127.0.0.1"


class Guarded:
    """A value pickle refuses (it holds a lock)."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.lock = threading.Lock()


@ray.remote
def unwrap(guarded: Guarded) -> int:
    return guarded.value + 1


def test_a_registered_serializer_is_used_and_travels_with_the_value() -> None:
    with pytest.raises(Exception, match="lock"):
        ray.put(Guarded(1))
    register_serializer(Guarded, serializer=lambda g: g.value, deserializer=Guarded)
    try:
        ref = ray.put(Guarded(41))
        assert ray.get(ref).value == 41
        assert ray.get(unwrap.remote(ref)) == 42  # the worker registered nothing
        assert ray.get(unwrap.remote(Guarded(1))) == 2
    finally:
        deregister_serializer(Guarded)
    with pytest.raises(Exception, match="lock"):
        ray.put(Guarded(1))


def test_inspect_serializability_names_what_cannot_be_serialized() -> None:
    lock = threading.Lock()

    def uses_the_lock() -> None:
        with lock:
            pass

    report = io.StringIO()
    ok, failures = inspect_serializability(uses_the_lock, name="uses_the_lock", print_file=report)
    assert not ok
    assert [(f.name, type(f.obj).__name__) for f in failures] == [("lock", "lock")]
    assert "lock of uses_the_lock cannot be serialized" in report.getvalue()
    assert inspect_serializability(lambda: 1, print_file=io.StringIO()) == (True, set())


@ray.remote
class Named:
    def ping(self) -> str:
        return "pong"


def test_list_named_actors_in_this_namespace_or_all() -> None:
    from sdk.util import list_named_actors

    here = Named.options(name="here").remote()
    there = Named.options(name="there", namespace="elsewhere").remote()
    Named.remote()  # anonymous: never listed
    ray.get([here.ping.remote(), there.ping.remote()])
    assert list_named_actors() == ["here"]
    listed = list_named_actors(all_namespaces=True)
    assert {"name": "there", "namespace": "elsewhere"} in listed
    assert {"name": "here", "namespace": ray.get_runtime_context().namespace} in listed
    ray.kill(here)
    deadline = time.monotonic() + 30
    while "here" in list_named_actors():  # gone once dead
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_memory_summary_lists_the_nodes_objects() -> None:
    from sdk._private.internal_api import memory_summary

    big, small = ray.put(b"x" * 2_000_000), ray.put("small")
    deadline = time.monotonic() + 30
    while True:  # (a put is "pending" until its created event is durable)
        text = memory_summary()
        lines = {line.split()[0]: line for line in text.splitlines() if line[:1].isalnum()}
        assert big.hex() in lines and small.hex() in lines
        if "stored" in lines[big.hex()] or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert "stored" in lines[big.hex()] and "2,000," in lines[big.hex()]
    assert text.index(big.hex()) < text.index(small.hex())  # largest first
    totals = memory_summary(stats_only=True, units="MB")
    assert big.hex() not in totals and "objects;" in totals and " MB " in totals
    with pytest.raises(ValueError, match="units"):
        memory_summary(units="parsecs")


def square(x: int) -> int:
    return x * x


def divide(a: int, b: int) -> float:
    return a / b


def set_greeting(text: str) -> None:
    os.environ["CAIRN_POOL_GREETING"] = text  # (in the pool's process)


def greeting(_: object = None) -> str:
    return os.environ.get("CAIRN_POOL_GREETING", "unset")


def test_a_pool_of_actors_works_as_multiprocessing_pool() -> None:
    from sdk.util.multiprocessing import Pool

    with Pool(processes=2, initializer=set_greeting, initargs=("hello",)) as pool:
        assert pool.map(square, range(10)) == [x * x for x in range(10)]
        assert pool.map(square, range(7), chunksize=3) == [x * x for x in range(7)]
        assert list(pool.imap(square, range(5))) == [0, 1, 4, 9, 16]
        assert sorted(pool.imap_unordered(square, range(5))) == [0, 1, 4, 9, 16]
        assert pool.starmap(divide, [(1, 2), (3, 4)]) == [0.5, 0.75]
        assert pool.apply(greeting) == "hello"  # the initializer ran in each process
        result = pool.apply_async(square, (7,))
        assert result.get(timeout=30) == 49 and result.successful()
        failed: list[BaseException] = []
        bad = pool.apply_async(divide, (1, 0), error_callback=failed.append)
        with pytest.raises(ZeroDivisionError):
            bad.get(timeout=30)
        assert not bad.successful() and isinstance(failed[0], ZeroDivisionError)
        pool.close()
        with pytest.raises(ValueError, match="Pool not running"):
            pool.map(square, [1])
        pool.join()
