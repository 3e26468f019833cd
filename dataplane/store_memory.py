"""The node's object memory, on the node daemon's side: the arena's regions (created as
the allocator grows, dataplane/arena.py) and the ranges handed out of them, each to a
writer that asked for room or to an object. The object table keeps the store's
accounting (``used``, ``capacity``: what admission and ``ObjectStoreFullError`` go
by); this module keeps where the bytes go, so taking room does both at once.

``StoreMemory`` is the one owner of which ranges are free. A range goes back to the
allocator when its object is freed (no process holds it), when the writer it was
handed to gives it back or dies, or -- for the bytes an object had before it was
rebuilt -- once the object's id is freed (dataplane/object_table.py, ``retired``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from dataplane import protocol as p
from dataplane import shm
from dataplane.arena import (
    DEFAULT_CHUNK,
    PAGE,
    ArenaAllocator,
    Range,
    aligned_size,
    create_region,
    remove_region,
)
from dataplane.object_table import ObjectTable

log = logging.getLogger("cairn.node")


class StoreMemory:
    def __init__(self, prefix: str, objects: ObjectTable, *, chunk: int = DEFAULT_CHUNK) -> None:
        self.prefix = prefix
        self.objects = objects
        capacity = max(objects.capacity, PAGE)
        self._arena = ArenaAllocator(capacity, chunk=min(chunk, capacity))
        self._ranges: dict[tuple[int, int], Range] = {}
        # why the last ``take`` could not make a region (/dev/shm full...), if it could not
        self.failure: str | None = None

    @property
    def largest_free(self) -> int:
        return self._arena.largest_free()

    def take(self, size: int) -> tuple[int, int] | None:
        """Room for ``size`` bytes, charged to the store: ``(region, offset)``, or None
        if the store is full (or too fragmented to hold it in one range)."""
        if not self.objects.charge(size):
            return None
        where = self._allocate(size)
        if where is None:
            self.objects.uncharge(size)
        return where

    def adopt(self, regions: Mapping[int, int], locations: list[p.ObjectLocation]) -> None:
        """A restarted daemon's memory (before it hands out any range): the regions the
        dead one left, already under this prefix (``{region: size}``), the ranges of the
        objects it adopts of them taken and charged, the rest free. ValueError (nothing
        changed) if the ranges do not fit the regions or overlap."""
        ranges = [
            Range(at.region, at.offset, aligned_size(at.size))
            for at in locations
            if at.region is not None
        ]
        arena = self._arena
        self._arena = ArenaAllocator.rebuild(arena.capacity, arena.chunk, regions, ranges)
        self._ranges = {(taken.region, taken.offset): taken for taken in ranges}
        for location in locations:
            self.objects.charge(location.size, force=True)

    def give_back(self, region: int, offset: int, size: int) -> None:
        """A range ``take`` handed out that never held an object (a failed write, a
        writer that died): free again, and uncharged."""
        self.free(region, offset)
        self.objects.uncharge(size)

    def give_back_location(self, location: p.ObjectLocation) -> None:
        """``give_back`` of an object's room that no object keeps (a stale attempt's
        return, a pull nobody wants any more, a daemon's own call's result)."""
        if location.region is not None:
            self.give_back(location.region, location.offset, location.size)

    def free(self, region: int, offset: int) -> None:
        """An object's range, once its object is freed (the table uncharged it)."""
        taken = self._ranges.pop((region, offset), None)
        if taken is not None:
            self._arena.free(taken)

    def free_location(self, location: p.ObjectLocation) -> None:
        if location.region is not None:
            self.free(location.region, location.offset)

    def _allocate(self, size: int) -> tuple[int, int] | None:
        got = self._arena.allocate(size)
        if got is None and self._release_empty_regions():
            got = self._arena.allocate(size)
        if got is None:
            return None
        new = self._arena.take_new_regions()
        try:
            for region in new:
                create_region(self.prefix, region, self._arena.region_size(region))
        except OSError as exc:  # /dev/shm is full (other users of it, a small tmpfs)
            self._arena.free(got)
            for region in new:  # none of them may hand out a range: no file
                remove_region(self.prefix, region)
                self._arena.drop_region(region)
            self.failure = f"a new store region could not be made in {shm.SHM_DIR}: {exc}"
            log.warning("object store: %s", self.failure)
            return None
        self.failure = None
        self._ranges[(got.region, got.offset)] = got
        return got.region, got.offset

    def _release_empty_regions(self) -> bool:
        """Gives wholly free regions back (their capacity may fit a larger range)."""
        released = self._arena.shrink()
        for region in released:
            remove_region(self.prefix, region)
            shm.mappings(self.prefix).forget(region)
        return bool(released)
