"""How well the arena allocator holds up under churn, and how fast memory can be
written into a kept mapping on this machine.

    .venv/bin/python bench/arena_fragmentation.py [--rounds 300] [--seed 1]

Churn: on a 2 GiB arena, allocate objects of mixed sizes (70% small 1 KiB-1 MiB, 25%
medium 1-64 MiB, 5% large 64-400 MiB, log-uniform within each class) until one does
not fit, free a random half of the live ones, and repeat. When an allocation is
refused the caller's policy is applied once first: ``shrink`` (give back wholly free
regions) and retry. Figures are taken after each free-half step: the share of free
memory that one object could take (``largest_free / free_bytes``) and
``largest_free / capacity``. Then the raw allocate/free rate on small objects.

Copy ceiling: an 800 MB NumPy buffer copied into a /dev/shm file mapped once with
MAP_POPULATE and kept (the arena's case), against a fresh mapping of the same file
for each copy, and against a fresh file for each copy (one segment per object).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import mmap
import os
import random
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataplane.arena import ArenaAllocator, Range
from dataplane.shm import SHM_DIR

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
CAPACITY = 2 * GIB
CLASSES = [(0.70, KIB, MIB), (0.25, MIB, 64 * MIB), (0.05, 64 * MIB, 400 * MIB)]


def object_size(rng: random.Random) -> int:
    roll = rng.random()
    for share, low, high in CLASSES:
        if roll < share:
            return int(math.exp(rng.uniform(math.log(low), math.log(high))))
        roll -= share
    return KIB


def churn(chunk: int, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    arena = ArenaAllocator(CAPACITY, chunk)
    live: list[Range] = []
    contiguous, of_capacity, fill = [], [], []
    ops, busy = 0, 0.0
    for _ in range(rounds):
        while True:
            size = object_size(rng)
            start = time.perf_counter()
            got = arena.allocate(size)
            if got is None:
                arena.shrink()
                got = arena.allocate(size)
            busy += time.perf_counter() - start
            ops += 1
            if got is None:
                break
            live.append(got)
        fill.append(arena.used / CAPACITY)
        rng.shuffle(live)
        half, live = live[: len(live) // 2], live[len(live) // 2 :]
        start = time.perf_counter()
        for r in half:
            arena.free(r)
        busy += time.perf_counter() - start
        ops += len(half)
        contiguous.append(arena.largest_free() / arena.free_bytes)
        of_capacity.append(arena.largest_free() / CAPACITY)
    arena.verify()
    print(
        f"  chunk {chunk // MIB:>5} MiB: used when full {statistics.mean(fill):6.1%} mean, "
        f"{min(fill):6.1%} min; after freeing half: largest_free/free_bytes "
        f"{statistics.mean(contiguous):6.1%} mean, {min(contiguous):6.1%} min; "
        f"largest_free/capacity {statistics.mean(of_capacity):6.1%} mean, "
        f"{min(of_capacity):6.1%} min; {len(arena.regions())} regions; "
        f"{ops / busy:,.0f} ops/s over {ops:,} ops"
    )


def rate(count: int, seed: int) -> None:
    """Allocate/free pairs on a warm arena holding many small objects."""
    rng = random.Random(seed)
    arena = ArenaAllocator(CAPACITY)
    live = [arena.allocate(rng.randint(KIB, 64 * KIB)) for _ in range(10_000)]
    sizes = [rng.randint(KIB, 64 * KIB) for _ in range(count)]
    picks = [rng.randrange(len(live)) for _ in range(count)]
    start = time.perf_counter()
    for size, pick in zip(sizes, picks, strict=True):
        old = live[pick]
        assert old is not None
        arena.free(old)
        live[pick] = arena.allocate(size)
    elapsed = time.perf_counter() - start
    print(
        f"  small-object churn, 10,000 live: {2 * count / elapsed:,.0f} ops/s "
        f"({elapsed / count * 1e6:.2f} us per free+allocate pair)"
    )


def best_of(copy: Callable[[], None], times: int = 3) -> float:
    best = math.inf
    for _ in range(times):
        start = time.perf_counter()
        copy()
        best = min(best, time.perf_counter() - start)
    return best


def copy_ceiling(size: int) -> None:
    source = np.ones(size, dtype=np.uint8)  # pages faulted in before any timing
    path = SHM_DIR / f"cairn-bench-arena-{os.getpid()}-{secrets.token_hex(4)}"
    fresh = path.with_name(path.name + "-fresh")
    populate: int = getattr(mmap, "MAP_POPULATE", 0)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            kept = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | populate)
        finally:
            os.close(fd)

        def into_kept() -> None:
            np.copyto(np.frombuffer(kept, dtype=np.uint8), source)

        def into_fresh_mapping() -> None:
            fd = os.open(path, os.O_RDWR)
            try:
                with mmap.mmap(fd, size, flags=mmap.MAP_SHARED) as mapping:
                    np.copyto(np.frombuffer(mapping, dtype=np.uint8), source)
            finally:
                os.close(fd)

        def into_fresh_file() -> None:
            fd = os.open(fresh, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, size)
                with mmap.mmap(fd, size, flags=mmap.MAP_SHARED) as mapping:
                    np.copyto(np.frombuffer(mapping, dtype=np.uint8), source)
            finally:
                os.close(fd)
                os.unlink(fresh)

        cases = [
            ("kept, populated mapping (arena)", into_kept),
            ("fresh mmap of the same file each time", into_fresh_mapping),
            ("fresh file each time (segment per object)", into_fresh_file),
        ]
        for label, copy in cases:
            seconds = best_of(copy)
            print(f"  {label:<42} {size / seconds / 1e9:6.2f} GB/s  ({seconds * 1e3:.0f} ms)")
        kept.close()
    finally:
        for leftover in (path, fresh):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--copy-mb", type=int, default=800)
    args = parser.parse_args()
    print(
        f"churn on a {CAPACITY // GIB} GiB arena, {args.rounds} rounds of fill-then-free-half, "
        f"seed {args.seed}:"
    )
    for chunk in (256 * MIB, 64 * MIB, CAPACITY):
        churn(chunk, args.rounds, args.seed)
    print("allocator rate:")
    rate(200_000, args.seed)
    print(
        f"copy of a {args.copy_mb} MB NumPy buffer into /dev/shm, best of 3 "
        f"({os.cpu_count()} CPUs):"
    )
    copy_ceiling(args.copy_mb * 1_000_000)


if __name__ == "__main__":
    main()
