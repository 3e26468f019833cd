"""The arena allocator (pure bookkeeping, checked against an independent byte map) and
its shared-memory regions (written in one mapping, read back in another and in a child
process, every file removed afterwards)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import secrets
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dataplane import shm
from dataplane.arena import (
    ALIGNMENT,
    PAGE,
    ArenaAllocator,
    ArenaMappings,
    ArenaRegion,
    Range,
    create_region,
    region_name,
    remove_region,
)

pytestmark = pytest.mark.timeout(60)

KIB = 1024
REPO = Path(__file__).resolve().parent.parent


class ByteMap:
    """Which ALIGNMENT-sized units of each region are taken, kept apart from the
    allocator's own bookkeeping to check it."""

    def __init__(self) -> None:
        self.units: dict[int, bytearray] = {}
        self.seen: set[int] = set()

    def sync_regions(self, arena: ArenaAllocator) -> None:
        regions = arena.regions()
        for region in list(self.units):
            if region not in regions:
                assert not any(self.units.pop(region)), f"released region {region} was in use"
        for region, size in regions.items():
            if region not in self.units:
                assert region not in self.seen, f"region index {region} reused"
                assert size % PAGE == 0
                self.units[region] = bytearray(size // ALIGNMENT)
                self.seen.add(region)

    def take(self, r: Range) -> None:
        units = self.units[r.region]
        start, stop = r.offset // ALIGNMENT, r.end // ALIGNMENT
        assert stop <= len(units), f"{r} runs past its region"
        assert not any(units[start:stop]), f"{r} overlaps a live range"
        units[start:stop] = b"\x01" * (stop - start)

    def give(self, r: Range) -> None:
        units = self.units[r.region]
        start, stop = r.offset // ALIGNMENT, r.end // ALIGNMENT
        assert all(units[start:stop])
        units[start:stop] = bytes(stop - start)

    def used(self) -> int:
        return sum(sum(units) for units in self.units.values()) * ALIGNMENT

    def longest_free(self) -> int:
        runs = [len(run) for units in self.units.values() for run in re.findall(b"\0+", units)]
        return max(runs, default=0) * ALIGNMENT


def _random_size(rng: random.Random, chunk: int) -> int:
    roll = rng.random()
    if roll < 0.7:
        return rng.randint(0, 4 * KIB)
    if roll < 0.97:
        return rng.randint(4 * KIB, chunk // 2)
    return rng.randint(chunk, 2 * chunk)  # bigger than a chunk: a region of its own


def test_ranges_are_aligned() -> None:
    arena = ArenaAllocator(capacity=16 * 1024 * KIB, chunk=1024 * KIB)
    for size in [0, 1, 63, 64, 65, 127, 4095, 4096, 4097, 100_001, 3 * 1024 * KIB + 5]:
        r = arena.allocate(size)
        assert r is not None
        assert r.offset % ALIGNMENT == 0 and r.size % ALIGNMENT == 0
        assert r.size >= max(size, 1) and r.size - max(size, 1) < ALIGNMENT
    assert all(s % PAGE == 0 for s in arena.regions().values())
    arena.verify()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_churn_never_overlaps_or_exceeds_capacity(seed: int) -> None:
    rng = random.Random(seed)
    chunk = 64 * KIB
    capacity = 20 * chunk + 8 * KIB + 100  # not a whole number of chunks, nor of pages
    arena = ArenaAllocator(capacity=capacity, chunk=chunk)
    bytemap = ByteMap()
    live: list[Range] = []
    refusals = 0
    for step in range(6000):
        if live and rng.random() < 0.45:
            r = live.pop(rng.randrange(len(live)))
            arena.free(r)
            bytemap.give(r)
        else:
            size = _random_size(rng, chunk)
            r = arena.allocate(size)
            if r is None:
                refusals += 1
                need = -(-max(size, 1) // ALIGNMENT) * ALIGNMENT
                # Refused only when it truly does not fit: no free run and no room to grow.
                assert bytemap.longest_free() < need
                grow_room = (capacity // PAGE * PAGE - sum(arena.regions().values())) // PAGE
                assert grow_room * PAGE < need
                if rng.random() < 0.5:
                    bytemap.sync_regions(arena)
                    arena.shrink()
            else:
                bytemap.sync_regions(arena)
                bytemap.take(r)
                live.append(r)
        bytemap.sync_regions(arena)
        assert sum(arena.regions().values()) <= capacity
        assert arena.used == bytemap.used() == sum(r.size for r in live)
        assert arena.used + arena.free_bytes == capacity // PAGE * PAGE
        if step % 250 == 0:
            arena.verify()
            assert arena.largest_free() >= bytemap.longest_free()
    assert refusals > 0, "the churn never filled the arena"
    arena.verify()


def test_freeing_everything_in_random_order_coalesces() -> None:
    rng = random.Random(7)
    chunk = 256 * KIB
    arena = ArenaAllocator(capacity=chunk, chunk=chunk)
    live = []
    while (r := arena.allocate(rng.randint(1, 3000))) is not None:
        live.append(r)
    assert len(live) > 100 and arena.largest_free() < 3000
    rng.shuffle(live)
    for r in live:
        arena.free(r)
    assert arena.free_ranges() == [Range(0, 0, chunk)]
    assert arena.used == 0 and arena.largest_free() == chunk == arena.free_bytes
    arena.verify()


def test_shrink_gives_back_wholly_free_regions_and_never_reuses_an_index() -> None:
    chunk = 64 * KIB
    arena = ArenaAllocator(capacity=4 * chunk, chunk=chunk)
    ranges = [arena.allocate(chunk) for _ in range(4)]
    assert arena.allocate(1) is None
    assert arena.take_new_regions() == [0, 1, 2, 3] and arena.take_new_regions() == []
    for r in ranges[1:3]:
        assert r is not None
        arena.free(r)
    assert arena.shrink() == [1, 2]
    assert sorted(arena.regions()) == [0, 3]
    big = arena.allocate(2 * chunk)
    assert big == Range(4, 0, 2 * chunk)
    assert arena.take_new_regions() == [4]
    for r in [ranges[0], ranges[3], big]:
        assert r is not None
        arena.free(r)
    assert arena.shrink() == [3, 4]  # one chunk-sized region is kept for the next fill
    assert arena.regions() == {0: chunk}
    assert arena.shrink() == []


def test_capacity_is_respected() -> None:
    chunk = 64 * KIB
    capacity = 3 * chunk + 16 * KIB
    arena = ArenaAllocator(capacity=capacity, chunk=chunk)
    assert arena.allocate(capacity + 1) is None
    assert arena.regions() == {}  # a refused allocation grows nothing
    sizes = []
    while (r := arena.allocate(10 * KIB)) is not None:
        sizes.append(r.size)
    assert sum(arena.regions().values()) == capacity
    assert sorted(arena.regions().values()) == [16 * KIB, chunk, chunk, chunk]
    assert arena.used == sum(sizes) <= capacity
    assert arena.largest_free() < 10 * KIB


def test_an_object_bigger_than_the_chunk_gets_a_region_of_its_own() -> None:
    chunk = 64 * KIB
    arena = ArenaAllocator(capacity=1024 * KIB, chunk=chunk)
    small = arena.allocate(100)
    big = arena.allocate(200_001)
    assert small == Range(0, 0, 128)
    assert big is not None and big.region == 1 and big.offset == 0
    assert arena.region_size(1) == -(-200_001 // PAGE) * PAGE
    assert arena.allocate(arena.capacity) is None  # more than is left
    arena.free(big)
    assert arena.shrink() == [1]
    assert arena.allocate(1024 * KIB - chunk) == Range(2, 0, 1024 * KIB - chunk)


def test_free_rejects_ranges_it_did_not_hand_out() -> None:
    arena = ArenaAllocator(capacity=1024 * KIB, chunk=64 * KIB)
    r = arena.allocate(1000)
    assert r is not None
    with pytest.raises(ValueError, match="not allocated"):
        arena.free(Range(r.region, r.offset, r.size + ALIGNMENT))
    arena.free(r)
    with pytest.raises(ValueError, match="not allocated"):
        arena.free(r)
    arena.verify()


def test_rebuild_from_live_ranges_reproduces_the_free_space() -> None:
    rng = random.Random(11)
    chunk = 64 * KIB
    arena = ArenaAllocator(capacity=16 * chunk, chunk=chunk)
    live: list[Range] = []
    for _ in range(3000):
        if live and rng.random() < 0.4:
            arena.free(live.pop(rng.randrange(len(live))))
        elif (r := arena.allocate(_random_size(rng, chunk))) is not None:
            live.append(r)
    for region in arena.shrink():
        assert not any(r.region == region for r in live)
    rebuilt = ArenaAllocator.rebuild(
        arena.capacity,
        arena.chunk,
        arena.regions(),
        reversed(arena.live_ranges()),
        next_region=arena.next_region,
    )
    rebuilt.verify()
    assert rebuilt.free_ranges() == arena.free_ranges()
    assert rebuilt.live_ranges() == sorted(live)
    assert (rebuilt.used, rebuilt.free_bytes, rebuilt.largest_free()) == (
        arena.used,
        arena.free_bytes,
        arena.largest_free(),
    )
    assert rebuilt.take_new_regions() == []  # their files exist already
    for _ in range(200):  # and both go on to hand out the same ranges
        size = _random_size(rng, chunk)
        assert rebuilt.allocate(size) == arena.allocate(size)


def test_rebuild_rejects_inconsistent_ranges() -> None:
    regions = {0: 64 * KIB}
    with pytest.raises(ValueError, match="overlaps"):
        ArenaAllocator.rebuild(1 << 20, 64 * KIB, regions, [Range(0, 0, 128), Range(0, 64, 64)])
    for bad in [Range(1, 0, 64), Range(0, 32, 64), Range(0, 64 * KIB - 64, 128)]:
        with pytest.raises(ValueError, match="within a region"):
            ArenaAllocator.rebuild(1 << 20, 64 * KIB, regions, [bad])


# -- shared memory ---------------------------------------------------------------------


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"cairn-test-arena-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield name
    finally:
        leftovers = sorted(p.name for p in shm.SHM_DIR.glob(f"{name}-*"))
        shm.unlink_all(name)
        assert leftovers == [], f"files left in /dev/shm: {leftovers}"


def _pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


CHILD = textwrap.dedent(
    """
    import hashlib, sys
    from dataplane.arena import ArenaMappings
    prefix = sys.argv[1]
    region, offset, size, out_region, out_offset = map(int, sys.argv[2:])
    with ArenaMappings(prefix, writable=False) as readonly:
        print(hashlib.sha256(readonly.view(region, offset, size)).hexdigest())
    with ArenaMappings(prefix) as mappings:
        view = mappings.view(out_region, out_offset, size, writable=True)
        view[:] = bytes(b ^ 0xFF for b in mappings.view(region, offset, size))
        view.release()
    """
)


def test_region_written_in_one_mapping_reads_back_in_another_and_in_a_child(
    prefix: str,
) -> None:
    chunk = 256 * KIB
    arena = ArenaAllocator(capacity=8 * chunk, chunk=chunk)
    ranges = [arena.allocate(size) for size in (1000, 100_000, 200_000, 300_000, 5)]
    source, target = ranges[2], arena.allocate(200_000)  # for the child to copy
    assert source is not None and target is not None
    for region in arena.take_new_regions():
        create_region(prefix, region, arena.region_size(region))
    path = shm.SHM_DIR / region_name(prefix, 0)
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_size == chunk and info.st_blocks * 512 >= chunk  # pages allocated
    with pytest.raises(FileExistsError):
        create_region(prefix, 0, chunk)

    writer, reader = ArenaMappings(prefix), ArenaMappings(prefix, writable=False)
    try:
        blobs = {}
        for i, r in enumerate(ranges):
            assert r is not None
            blobs[r] = _pattern(i, r.size)
            view = writer.view_range(r, writable=True)
            view[:] = blobs[r]
            view.release()
        written = sorted({r.region for r in blobs})
        assert writer.mapped() == written  # mapped lazily, as ranges are referenced
        for r, blob in blobs.items():
            view = reader.view_range(r)
            assert view.readonly and bytes(view) == blob
            with pytest.raises(TypeError):
                view[0] = 0
        # Each region is mapped once, however many views are taken of it.
        assert reader.mapped() == written
        assert reader.region(0) is reader.region(0)
        with pytest.raises(ValueError, match="outside region"):
            reader.view(0, chunk - 64, 128)
        with pytest.raises(ValueError, match="read-only"):
            reader.view(0, 0, 64, writable=True)
        assert writer.view(0, 0, 64).readonly  # a writer's views are read-only unless asked

        args = (source.region, source.offset, source.size, target.region, target.offset)
        child = subprocess.run(
            [sys.executable, "-c", CHILD, prefix, *map(str, args)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == hashlib.sha256(blobs[source]).hexdigest()
        assert bytes(reader.view_range(target)) == bytes(b ^ 0xFF for b in blobs[source])
    finally:
        writer.close()
        reader.close()
    assert reader.mapped() == []
    assert shm.unlink_all(prefix) == len(arena.regions())


def test_close_while_a_view_is_alive_leaves_the_mapping_to_it(prefix: str) -> None:
    create_region(prefix, 0, PAGE)
    mappings = ArenaMappings(prefix)
    view = mappings.view(0, 0, 16, writable=True)
    view[:] = b"still here, yes!"
    mappings.close()  # the map cannot be unmapped under the view: no error, no unmap
    assert bytes(view) == b"still here, yes!"
    region = ArenaRegion(prefix, 0, writable=False)
    assert bytes(region.view(0, 16)) == b"still here, yes!"
    region.close()
    with pytest.raises(ValueError, match="closed"):
        region.view(0, 16)
    view.release()
    remove_region(prefix, 0)
    remove_region(prefix, 0)  # already gone: fine
    assert not (shm.SHM_DIR / region_name(prefix, 0)).exists()


def test_a_released_region_keeps_its_pages_for_who_maps_it(prefix: str) -> None:
    create_region(prefix, 0, PAGE)
    mappings = ArenaMappings(prefix)
    mappings.view(0, 0, 4, writable=True)[:] = b"kept"
    remove_region(prefix, 0)
    assert bytes(mappings.view(0, 0, 4)) == b"kept"  # the kept mapping outlives the name
    mappings.forget(0)
    assert mappings.mapped() == []
    with pytest.raises(FileNotFoundError):
        mappings.view(0, 0, 4)
