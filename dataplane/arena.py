"""The object store as an arena: a node's object memory is a few large shared-memory
regions, mapped once per process and kept, with ranges of them handed out by one
allocator in the node daemon.

Why: with one /dev/shm file per object, every put and every get maps a fresh file and
pays a page fault per page (and a fresh file also pays page allocation and zeroing),
so large objects move at a fraction of memcpy speed. A region here is allocated in
full when it is created (posix_fallocate) and mapped populated once per process, so
writing or reading an object afterwards is a plain memcpy into pages already mapped.

Who owns what:

- The node daemon's ``ArenaAllocator`` is the one owner of which ranges are free. It
  does no I/O: when it grows (a new region) or shrinks (wholly free regions given
  back), the daemon creates or unlinks the region files (``create_region``,
  ``remove_region``; ``dataplane.shm.unlink_all(prefix)`` removes them all, as their
  names start with ``{prefix}-``).
- A range is reused only after the daemon frees it, and the daemon frees an object
  only when no process reads it any more, so a reader never sees its bytes change.
- Region indices are never reused: a process that still maps a released region (its
  pages live on until the mapping goes) can never mistake it for a newer region under
  the same index.
- Every process keeps one ``ArenaMappings``: each region mapped at most once, lazily,
  the first time a range in it is referenced; views are slices of that mapping.

Ranges are ``ALIGNMENT``-aligned in offset and size, so NumPy and Arrow buffers laid
out in them (themselves 64-byte aligned within a blob) stay aligned in memory.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

SHM_DIR = Path("/dev/shm")

ALIGNMENT = 64
PAGE = mmap.PAGESIZE
DEFAULT_CHUNK = 256 * 1024 * 1024
_MAP_POPULATE: int = getattr(mmap, "MAP_POPULATE", 0)


def _ceil(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _floor(value: int, unit: int) -> int:
    return value // unit * unit


def aligned_size(size: int) -> int:
    """The size of the range an object of ``size`` bytes takes."""
    return _ceil(max(size, 1), ALIGNMENT)


@dataclass(frozen=True, slots=True, order=True)
class Range:
    """Bytes ``[offset, offset + size)`` of region ``region``; ``size`` is the aligned
    size the allocator reserved, which may exceed the object's own length."""

    region: int
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


class ArenaAllocator:
    """Best-fit allocation of aligned ranges over regions grown in ``chunk``s, up to
    ``capacity`` bytes in all (``object_store_memory``); pure bookkeeping, no I/O.

    Free ranges sit in one list sorted by (size, region, offset), so best fit is a
    bisection (ties go to the lowest region and offset, which lets the later regions
    empty out), and in two maps keyed by their start and their end, so a freed range
    merges with its free neighbours at once: free space is always fully coalesced.

    ``allocate`` returns None when no free range fits and the capacity left cannot hold
    a new region big enough; the caller then calls ``shrink`` (a wholly free region
    counts against the capacity but may be too small), spills or evicts, and retries.
    """

    def __init__(self, capacity: int, chunk: int = DEFAULT_CHUNK) -> None:
        if capacity < 0 or chunk <= 0:
            raise ValueError(f"bad arena capacity {capacity} or chunk {chunk}")
        # Regions are whole pages: a capacity that is not is rounded down.
        self.capacity = _floor(capacity, PAGE)
        self.chunk = _ceil(chunk, PAGE)
        self.used = 0
        self.reserved = 0  # bytes in regions, free or not
        self._regions: dict[int, int] = {}
        self._next_region = 0
        self._new: list[int] = []
        self._by_size: list[tuple[int, int, int]] = []  # (size, region, offset)
        self._free_at: dict[tuple[int, int], int] = {}  # (region, offset) -> size
        self._free_until: dict[tuple[int, int], int] = {}  # (region, end) -> offset
        self._live: dict[tuple[int, int], int] = {}  # (region, offset) -> size

    # -- counters ------------------------------------------------------------------

    @property
    def headroom(self) -> int:
        """Capacity not yet taken by a region (room to grow)."""
        return max(0, _floor(self.capacity - self.reserved, PAGE))

    @property
    def free_bytes(self) -> int:
        """Everything a caller could still get, fragmented or not."""
        return self.reserved - self.used + self.headroom

    def largest_free(self) -> int:
        """The largest size one ``allocate`` call would get now."""
        in_regions = self._by_size[-1][0] if self._by_size else 0
        return max(in_regions, self.headroom)

    def regions(self) -> dict[int, int]:
        """Index -> size of every region the caller must have a file for."""
        return dict(self._regions)

    @property
    def next_region(self) -> int:
        """The index the next new region gets (indices are never reused)."""
        return self._next_region

    def region_size(self, region: int) -> int:
        return self._regions[region]

    def take_new_regions(self) -> list[int]:
        """Regions added since the last call, for the caller to create files for
        before handing out ranges in them."""
        new, self._new = self._new, []
        return new

    def free_ranges(self) -> list[Range]:
        return sorted(Range(r, o, s) for (r, o), s in self._free_at.items())

    def live_ranges(self) -> list[Range]:
        return sorted(Range(r, o, s) for (r, o), s in self._live.items())

    # -- allocation ----------------------------------------------------------------

    def allocate(self, size: int) -> Range | None:
        if size < 0:
            raise ValueError(f"negative size {size}")
        need = aligned_size(size)
        i = bisect.bisect_left(self._by_size, (need, -1, -1))
        if i == len(self._by_size):
            if not self._grow(need):
                return None
            i = bisect.bisect_left(self._by_size, (need, -1, -1))
        have, region, offset = self._by_size.pop(i)
        del self._free_at[(region, offset)]
        del self._free_until[(region, offset + have)]
        if have > need:
            self._add_free(region, offset + need, have - need)
        self._live[(region, offset)] = need
        self.used += need
        return Range(region, offset, need)

    def free(self, range_: Range) -> None:
        region, offset = range_.region, range_.offset
        size = self._live.get((region, offset))
        if size is None or size != range_.size:
            raise ValueError(f"{range_} is not allocated")
        del self._live[(region, offset)]
        self.used -= size
        left = self._free_until.get((region, offset))
        if left is not None:
            self._remove_free(region, left, offset - left)
            size += offset - left
            offset = left
        right = self._free_at.get((region, offset + size))
        if right is not None:
            self._remove_free(region, offset + size, right)
            size += right
        self._add_free(region, offset, size)

    def shrink(self) -> list[int]:
        """Gives back wholly free regions, returning their indices so the caller can
        unlink their files (once no process needs their pages). One free region of at
        most ``chunk`` bytes is kept when nothing else would be, so that a store that
        empties and fills again does not recreate its first region every time."""
        empty = [r for r, s in self._regions.items() if self._free_at.get((r, 0)) == s]
        keep: int | None = None
        if len(empty) == len(self._regions):
            keep = next((r for r in sorted(empty) if self._regions[r] <= self.chunk), None)
        released = [r for r in sorted(empty) if r != keep]
        for region in released:
            self.drop_region(region)
        return released

    def drop_region(self, region: int) -> None:
        """Forgets a wholly free region (one whose file could not be created, say)."""
        size = self._regions[region]
        if self._free_at.get((region, 0)) != size:
            raise ValueError(f"region {region} still holds live ranges")
        self._remove_free(region, 0, size)
        del self._regions[region]
        self.reserved -= size
        with contextlib.suppress(ValueError):
            self._new.remove(region)

    def _grow(self, need: int) -> bool:
        size = min(max(self.chunk, _ceil(need, PAGE)), self.headroom)
        if size < need:
            return False
        region = self._next_region
        self._next_region += 1
        self._regions[region] = size
        self.reserved += size
        self._new.append(region)
        self._add_free(region, 0, size)
        return True

    def _add_free(self, region: int, offset: int, size: int) -> None:
        bisect.insort(self._by_size, (size, region, offset))
        self._free_at[(region, offset)] = size
        self._free_until[(region, offset + size)] = offset

    def _remove_free(self, region: int, offset: int, size: int) -> None:
        i = bisect.bisect_left(self._by_size, (size, region, offset))
        del self._by_size[i]
        del self._free_at[(region, offset)]
        del self._free_until[(region, offset + size)]

    # -- restart -------------------------------------------------------------------

    @classmethod
    def rebuild(
        cls,
        capacity: int,
        chunk: int,
        region_sizes: Mapping[int, int],
        live_ranges: Iterable[Range],
        *,
        next_region: int | None = None,
    ) -> ArenaAllocator:
        """The allocator of a daemon that restarts over existing region files: the
        regions as they are, the live ranges of the objects that survived, and the
        gaps between them free. ``next_region`` (the old ``next_region``, if known)
        keeps indices of regions released before the restart from being reused."""
        arena = cls(capacity, chunk)
        for region, size in region_sizes.items():
            if region < 0 or size <= 0 or size % ALIGNMENT:
                raise ValueError(f"bad region {region} of {size} bytes")
            arena._regions[region] = size
            arena.reserved += size
        arena._next_region = max(max(region_sizes, default=-1) + 1, next_region or 0)
        per_region: dict[int, list[Range]] = {r: [] for r in region_sizes}
        for live in live_ranges:
            bound = region_sizes.get(live.region)
            if (
                bound is None
                or live.offset < 0
                or live.size <= 0
                or live.offset % ALIGNMENT
                or live.size % ALIGNMENT
                or live.end > bound
            ):
                raise ValueError(f"{live} is not an aligned range within a region")
            per_region[live.region].append(live)
        for region, ranges in per_region.items():
            cursor = 0
            for live in sorted(ranges, key=lambda r: r.offset):
                if live.offset < cursor:
                    raise ValueError(f"{live} overlaps another live range")
                if live.offset > cursor:
                    arena._add_free(region, cursor, live.offset - cursor)
                arena._live[(region, live.offset)] = live.size
                arena.used += live.size
                cursor = live.end
            if cursor < region_sizes[region]:
                arena._add_free(region, cursor, region_sizes[region] - cursor)
        return arena

    def verify(self) -> None:
        """Checks the bookkeeping against itself (tests, debugging): live and free
        ranges tile every region exactly, and no two free ranges touch."""
        spans: dict[int, list[tuple[int, int, bool]]] = {r: [] for r in self._regions}
        for (r, o), s in self._live.items():
            spans[r].append((o, s, False))
        for (r, o), s in self._free_at.items():
            spans[r].append((o, s, True))
        for region, parts in spans.items():
            cursor, last_free = 0, False
            for offset, size, free in sorted(parts):
                if offset != cursor or offset % ALIGNMENT or size % ALIGNMENT:
                    raise AssertionError(f"region {region} is not tiled at {offset}")
                if free and last_free:
                    raise AssertionError(f"uncoalesced free ranges at {region}:{offset}")
                cursor, last_free = offset + size, free
            if cursor != self._regions[region]:
                raise AssertionError(f"region {region} is tiled to {cursor}")
        frees = sorted((s, r, o) for (r, o), s in self._free_at.items())
        if frees != self._by_size or len(self._free_until) != len(frees):
            raise AssertionError("free indexes disagree")
        if self.used != sum(self._live.values()):
            raise AssertionError("used is off")
        if self.reserved != sum(self._regions.values()):
            raise AssertionError("reserved is off")


# -- shared memory ---------------------------------------------------------------------


def region_name(prefix: str, region: int) -> str:
    return f"{prefix}-arena-{region}"


def create_region(prefix: str, region: int, size: int) -> None:
    """Creates region ``region``'s file with all its pages allocated now, so neither
    a writer nor a reader pays for page allocation later (and a full /dev/shm fails
    here, not with SIGBUS in a writer). Fails if the file exists."""
    path = SHM_DIR / region_name(prefix, region)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)


def take_over_regions(old_prefix: str, prefix: str) -> dict[int, int]:
    """Renames the regions a dead daemon left (``old_prefix``) to ``prefix``, the
    daemon that adopts them, keeping their indices: ``{region: size}``. (A rename keeps
    the pages: what the objects in them hold is untouched.)"""
    regions: dict[int, int] = {}
    marker = f"{old_prefix}-arena-"
    for path in SHM_DIR.glob(f"{marker}*"):
        index = path.name[len(marker) :]
        if not index.isdigit():
            continue
        with contextlib.suppress(FileNotFoundError):
            size = path.stat().st_size
            path.rename(SHM_DIR / region_name(prefix, int(index)))
            regions[int(index)] = size
    return regions


def remove_region(prefix: str, region: int) -> None:
    """Removes the file; processes that still map it keep its pages until they let go."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SHM_DIR / region_name(prefix, region))


class ArenaRegion:
    """One region's file, mapped once (populated) and kept."""

    def __init__(
        self, prefix: str, region: int, *, writable: bool = True, populate: bool = True
    ) -> None:
        """``populate``: map every page now (a process that copies whole objects in or
        out); else each page is mapped when first touched (the node daemon, which reads
        little of a region and must not stall its event loop mapping a large one)."""
        self.region = region
        self.writable = writable
        fd = os.open(SHM_DIR / region_name(prefix, region), os.O_RDWR if writable else os.O_RDONLY)
        try:
            self.size = os.fstat(fd).st_size
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._map: mmap.mmap | None = mmap.mmap(
                fd,
                self.size,
                flags=mmap.MAP_SHARED | (_MAP_POPULATE if populate else 0),
                prot=prot,
            )
        finally:
            os.close(fd)
        # One export of the map that every view slices: slicing a memoryview costs no
        # new export, and close has only this one to release.
        self._base: memoryview | None = memoryview(self._map)

    def view(self, offset: int, size: int, *, writable: bool = False) -> memoryview:
        """Bytes ``[offset, offset + size)``; read-only unless asked (and mapped) so."""
        if self._base is None:
            raise ValueError(f"region {self.region} is closed")
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(
                f"range {offset}+{size} is outside region {self.region} of {self.size} bytes"
            )
        if writable and not self.writable:
            raise ValueError(f"region {self.region} is mapped read-only")
        part = self._base[offset : offset + size]
        return part if writable else part.toreadonly()

    def tracked(self, offset: int, size: int) -> ctypes.Array[ctypes.c_char]:
        """Bytes ``[offset, offset + size)`` as an object whose life a caller can follow
        (``weakref.finalize``): every buffer made from it keeps it alive (a memoryview
        of a memoryview would not say when the last one goes)."""
        if self._map is None or not self.writable:
            raise ValueError(f"region {self.region} is closed or mapped read-only")
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(
                f"range {offset}+{size} is outside region {self.region} of {self.size} bytes"
            )
        return (ctypes.c_char * size).from_buffer(self._map, offset)

    def close(self) -> None:
        """Releases the mapping, or, while views of it are still alive (an array built
        on one, say), leaves it to be unmapped when the last of them goes."""
        base, self._base = self._base, None
        mapping, self._map = self._map, None
        if base is not None:
            with contextlib.suppress(BufferError):  # exported by a caller's memoryview()
                base.release()
        if mapping is not None:
            # Views still exported: dropping our reference lets the map close itself
            # (and unmap) once the last view is garbage collected.
            with contextlib.suppress(BufferError):
                mapping.close()


class ArenaMappings:
    """A process's mappings of a node's regions: each mapped at most once, the first
    time a range in it is referenced, and kept until ``forget`` or ``close``."""

    def __init__(self, prefix: str, *, writable: bool = True, populate: bool = True) -> None:
        self.prefix = prefix
        self.writable = writable
        self.populate = populate
        self._regions: dict[int, ArenaRegion] = {}
        self._lock = threading.Lock()

    def region(self, region: int) -> ArenaRegion:
        mapped = self._regions.get(region)
        if mapped is None:
            with self._lock:
                mapped = self._regions.get(region)
                if mapped is None:
                    mapped = ArenaRegion(
                        self.prefix, region, writable=self.writable, populate=self.populate
                    )
                    self._regions[region] = mapped
        return mapped

    def view(self, region: int, offset: int, size: int, *, writable: bool = False) -> memoryview:
        return self.region(region).view(offset, size, writable=writable)

    def view_range(self, range_: Range, *, writable: bool = False) -> memoryview:
        return self.view(range_.region, range_.offset, range_.size, writable=writable)

    def mapped(self) -> list[int]:
        return sorted(self._regions)

    def forget(self, region: int) -> None:
        """Drops a released region's mapping (its index is never reused)."""
        with self._lock:
            mapped = self._regions.pop(region, None)
        if mapped is not None:
            mapped.close()

    def close(self) -> None:
        with self._lock:
            regions, self._regions = self._regions, {}
        for mapped in regions.values():
            mapped.close()

    def __enter__(self) -> ArenaMappings:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
