"""Spilling: a full store spills objects nobody is using to disk instead of refusing
new ones, and restores them when wanted; the log records both; freed spilled objects
leave no file behind."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import numpy as np
import pytest
from log_rows import rows

import sdk as ray

pytestmark = pytest.mark.timeout(120)
MB = 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def node() -> Iterator[None]:
    ray.init(num_cpus=2, object_store_memory=100 * MB)
    try:
        yield
    finally:
        ray.shutdown()


@ray.remote
def total(*arrays: np.ndarray) -> int:
    return int(sum(int(a.sum()) for a in arrays))


@ray.remote
def make(n: int) -> np.ndarray:
    return np.full(30 * MB // 8, n, dtype=np.int64)


def _events(query: str) -> list[asyncpg.Record]:
    return rows(ray.get_runtime_context().gcs_address, query)


def test_a_full_store_spills_to_disk_and_restores_on_demand() -> None:
    arrays = [np.full(30 * MB // 8, n, dtype=np.int64) for n in range(6)]
    refs = [ray.put(a) for a in arrays]  # 180 MB through a 100 MB store
    for n, ref in enumerate(refs):  # each one back (restoring spills others)
        value = ray.get(ref, timeout=60)
        assert value.shape == arrays[n].shape and int(value[0]) == int(value[-1]) == n
        del value
    assert ray.get(total.remote(refs[0], refs[5]), timeout=60) == 5 * (30 * MB // 8)
    made = [make.remote(n) for n in range(10, 13)]  # task results spill others too
    assert [int(ray.get(ref, timeout=60)[-1]) for ref in made] == [10, 11, 12]
    refs += made
    spilled = _events(
        "SELECT entity_id, payload->>'path' AS path FROM events "
        "WHERE event_type = 'spilled' AND entity_kind = 'object'"
    )
    restored = _events("SELECT entity_id FROM events WHERE event_type = 'restored'")
    hexes = {ref.hex() for ref in refs}
    assert {row["entity_id"] for row in spilled} <= hexes and len(spilled) >= 3
    assert {row["entity_id"] for row in restored} <= hexes and len(restored) >= 2
    paths = {Path(row["path"]) for row in spilled}

    del refs, ref, made
    gc.collect()
    deadline = time.monotonic() + 30
    while any(path.exists() for path in paths):  # freed objects' files go too
        assert time.monotonic() < deadline, [p for p in paths if p.exists()]
        time.sleep(0.05)


def test_a_spilled_copy_that_vanished_is_lost_not_waited_for() -> None:
    from sdk.exceptions import ObjectLostError

    refs = [ray.put(np.full(30 * MB // 8, n, dtype=np.int64)) for n in range(5)]
    spilled = {
        row["entity_id"]: Path(row["path"])
        for row in _events(
            "SELECT entity_id, payload->>'path' AS path FROM events "
            "WHERE event_type = 'spilled' AND entity_kind = 'object'"
        )
    }
    victim = next(r for r in refs if r.hex() in spilled and spilled[r.hex()].exists())
    spilled[victim.hex()].unlink()  # its only copy, gone behind the store's back
    with pytest.raises(ObjectLostError, match="spilled copy could not be read back"):
        ray.get(victim, timeout=30)  # a put: no task to re-run
    others = [r for r in refs if r != victim]
    assert [int(ray.get(r, timeout=60)[0]) for r in others] == [
        n for n in range(5) if refs[n] != victim
    ]


def test_an_object_being_read_is_never_spilled_under_its_reader() -> None:
    """A value read from the store keeps its bytes where they are while anything built
    on them lives: a full store spills other objects, and puts that reuse the room
    others had never change what the reader sees."""
    kept_ref = ray.put(np.full(30 * MB // 8, 7, dtype=np.int64))
    kept = ray.get(kept_ref, timeout=60)
    others = [ray.put(np.full(30 * MB // 8, n, dtype=np.int64)) for n in range(6)]  # spill
    for n, ref in enumerate(others):  # each back in turn, reusing the room others had
        assert int(ray.get(ref, timeout=60)[-1]) == n
    assert int(kept.min()) == int(kept.max()) == 7
    spilled = {
        r["entity_id"] for r in _events("SELECT entity_id FROM events WHERE event_type = 'spilled'")
    }
    assert kept_ref.hex() not in spilled and set(r.hex() for r in others) & spilled
    del kept, others
    gc.collect()
