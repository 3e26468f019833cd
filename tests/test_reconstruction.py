"""Lineage reconstruction on one node: an object whose bytes vanish is rebuilt by
re-running its task from the log, recursively through freed arguments; the limits are
Ray's (no lineage for put objects, none with max_retries=0, at most max_retries runs)."""

from __future__ import annotations

import time

import asyncpg
import numpy as np
import pytest
from log_rows import rows, wait_for_rows
from store_objects import flip, object_bytes

import sdk as ray
from sdk.exceptions import ObjectLostError, ObjectReconstructionFailedMaxAttemptsExceededError

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("private_cluster")]
MB = 1024 * 1024


@ray.remote
def start(n: int) -> np.ndarray:
    return np.full(10 * MB // 8, n, dtype=np.int64)


@ray.remote
def step(previous: np.ndarray, k: int) -> np.ndarray:
    return previous + k


@ray.remote(max_retries=0)
def unrebuildable(n: int) -> np.ndarray:
    return np.full(MB, n, dtype=np.uint8)


@ray.remote(max_retries=1)
def once_more(n: int) -> np.ndarray:
    return np.full(MB, n, dtype=np.uint8)


def _lose(ref: ray.ObjectRef) -> None:
    """Damages an object's bytes behind the node's back (its framing), as bad memory
    or a stray write would: whoever reads it next finds it lost."""
    flip(ref, 0, 16, mask=0xFF)


def _events(query: str, *args: object) -> list[asyncpg.Record]:
    return rows(ray.get_runtime_context().gcs_address, query, *args)


def test_a_lost_object_is_rebuilt_through_its_freed_lineage() -> None:
    ref = start.remote(0)
    for k in range(1, 20):  # a chain of 20 tasks; only the last output is held
        ref = step.remote(ref, k)
    expected = sum(range(20))
    assert int(ray.get(ref)[-1]) == expected
    upstream = ref.task_id().hex()
    _lose(ref)
    value = ray.get(ref, timeout=60)
    assert value.shape == (10 * MB // 8,) and int(value[0]) == int(value[-1]) == expected

    rebuilt = _events(
        "SELECT entity_id, payload FROM events WHERE event_type = 'reconstructing' "
        "ORDER BY position"
    )
    assert rebuilt[0]["entity_id"] == upstream  # the lost object's task first
    assert len({row["entity_id"] for row in rebuilt}) == 20  # then all of its freed lineage
    history = [
        row["event_type"]
        for row in _events(
            "SELECT event_type FROM events WHERE entity_id = $1 ORDER BY position", upstream
        )
    ]
    assert history[:3] == ["submitted", "waiting_for_dependencies", "running"]
    assert history[3:] == ["finished", "reconstructing", "running", "finished"]


def test_a_put_object_has_no_lineage_and_max_retries_zero_turns_reconstruction_off() -> None:
    put = ray.put(np.ones(MB, dtype=np.uint8))
    _lose(put)
    with pytest.raises(ObjectLostError):
        ray.get(put, timeout=30)
    made = unrebuildable.remote(1)
    ray.get(made)
    _lose(made)
    with pytest.raises(ObjectLostError, match="max_retries=0") as caught:
        ray.get(made, timeout=30)
    assert not isinstance(caught.value, ObjectReconstructionFailedMaxAttemptsExceededError)


def test_a_durable_put_is_recovered_from_its_copy_on_disk() -> None:
    value = np.arange(MB, dtype=np.int64)
    durable = ray.put(value, durable=True)
    url = ray.get_runtime_context().gcs_address
    query = (
        "SELECT event_type, payload->>'durable_path' AS path FROM events "
        "WHERE entity_id = $1 ORDER BY position"
    )
    wait_for_rows(url, query, durable.hex())  # its copy is made before its created event
    _lose(durable)
    assert np.array_equal(ray.get(durable, timeout=30), value)
    # `lost` and `restored` are written behind (the value was durable all along): the
    # get may come back before they commit
    history = wait_for_rows(url, query, durable.hex(), count=3, timeout=10)
    assert [row["event_type"] for row in history] == ["created", "lost", "restored"]
    assert history[0]["path"] and history[0]["path"].endswith(durable.hex())
    small = ray.put({"k": "v"})  # small values are in the log whatever the option
    (data,) = _events("SELECT data FROM events WHERE entity_id = $1", small.hex())
    assert data["data"] is not None and ray.get(small) == {"k": "v"}


def test_reconstruction_stops_at_max_retries() -> None:
    ref = once_more.remote(7)
    assert int(ray.get(ref)[0]) == 7
    _lose(ref)
    assert int(ray.get(ref, timeout=30)[0]) == 7  # attempt 1 of max_retries=1
    _lose(ref)
    with pytest.raises(ObjectReconstructionFailedMaxAttemptsExceededError, match="max_retries=1"):
        ray.get(ref, timeout=30)


def test_a_task_whose_argument_vanished_waits_for_it_and_runs_again() -> None:
    made = start.remote(5)
    ray.get(made)
    _lose(made)  # nobody has noticed yet: the task finds it gone
    assert int(ray.get(step.remote(made, 1), timeout=60)[0]) == 6


def test_a_corrupt_or_damaged_object_is_detected_and_rebuilt_never_returned() -> None:
    corrupt, damaged = start.remote(1), start.remote(2)
    ray.wait([corrupt, damaged], num_returns=2)
    flip(corrupt, 0, 16, mask=0xFF)  # its framing
    flip(damaged, object_bytes(damaged)[2] // 2, 8)  # its value: the checksum says so
    assert int(ray.get(corrupt, timeout=60)[-1]) == 1  # rebuilt, not the damaged bytes
    assert int(ray.get(step.remote(damaged, 1), timeout=60)[-1]) == 3  # a task saw it
    reasons = [
        row["reason"]
        for row in _events(
            "SELECT payload->>'reason' AS reason FROM events "
            "WHERE event_type = 'lost' AND entity_id = ANY($1::text[]) ORDER BY position",
            [corrupt.hex(), damaged.hex()],
        )
    ]
    assert any("corrupt" in r for r in reasons) and any("checksum" in r for r in reasons)
    put = ray.put(np.ones(MB, dtype=np.uint8))  # no lineage, not durable: a clear error
    deadline = time.monotonic() + 30
    while not _events("SELECT 1 FROM events WHERE entity_id = $1", put.hex()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    flip(put, 0, 16, mask=0xFF)
    with pytest.raises(ObjectLostError, match="corrupt"):
        ray.get(put, timeout=30)
    assert int(ray.get(start.remote(9))[0]) == 9  # the node and its workers carry on


@ray.remote
def raise_unrebuildable() -> None:
    class NeedsTwoArguments(Exception):  # (pickled by value, with the function)
        def __init__(self, message: str, code: int) -> None:
            super().__init__(message)  # pickles as (message,): cannot be rebuilt
            self.code = code

    raise NeedsTwoArguments("the original error", 7)


def test_an_exception_that_cannot_be_rebuilt_still_gives_a_clear_error() -> None:
    from sdk.exceptions import RayTaskError

    with pytest.raises(RayTaskError) as caught:
        ray.get(raise_unrebuildable.remote(), timeout=30)
    text = str(caught.value)
    assert "NeedsTwoArguments: the original error" in text  # the remote traceback
    assert "could not be rebuilt here" in text
    assert int(ray.get(start.remote(3))[0]) == 3  # workers and node carry on


def test_the_lineage_of_an_object_is_a_query_of_the_log() -> None:
    seed = ray.put(np.arange(10))
    left, right = step.remote(seed, 1), step.remote(seed, 2)
    both = add_arrays.remote(left, right)
    assert int(ray.get(both)[0]) == 3
    rows = _events("SELECT * FROM lineage($1)", both.hex())
    by_depth = {}
    for row in rows:
        by_depth.setdefault(row["depth"], []).append(row)
    assert [(r["object_id"], r["task_id"]) for r in by_depth[0]] == [
        (both.hex(), both.task_id().hex())
    ]
    assert by_depth[0][0]["function_name"].endswith("add_arrays")
    assert {r["task_id"] for r in by_depth[1]} == {left.task_id().hex(), right.task_id().hex()}
    assert {r["function_name"].rsplit(".", 1)[1] for r in by_depth[1]} == {"step"}
    assert {(r["object_id"], r["task_id"]) for r in by_depth[2]} == {(seed.hex(), None)}  # a put
    assert set(by_depth) == {0, 1, 2}


@ray.remote
def add_arrays(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b
