"""Segments of freed objects, kept for reuse: writing into a segment whose pages are
already allocated runs at memcpy speed, while a fresh segment costs page allocation
and zeroing (measured here: ~7 GB/s against ~1.5 GB/s).

A segment is recycled only once its object is freed, and an object is not freed while
any process maps it (readers hold it while a mapping lives), so reuse never changes
bytes a reader can see. Pooled bytes count against the store's capacity and are
evicted first when room is needed.
"""

from __future__ import annotations

import itertools

from dataplane import shm


class SegmentPool:
    def __init__(self, prefix: str, limit: int) -> None:
        self._prefix = prefix
        self.limit = limit
        self.bytes = 0
        self._free: list[tuple[int, str]] = []
        self._names = itertools.count(1)

    def keep(self, name: str, size: int) -> bool:
        """Takes a freed object's segment into the pool; False when it is full."""
        if self.bytes + size > self.limit:
            return False
        pooled = f"{self._prefix}-pool-{next(self._names)}"
        if not shm.recycle_segment(name, pooled):
            return False
        self._free.append((size, pooled))
        self.bytes += size
        return True

    def take(self, size: int) -> str | None:
        """The smallest pooled segment of ``size`` to ``2 * size`` bytes, if any."""
        fits = [entry for entry in self._free if size <= entry[0] <= 2 * size]
        if not fits:
            return None
        best = min(fits)
        self._free.remove(best)
        self.bytes -= best[0]
        return best[1]

    def evict(self, needed: int) -> int:
        """Unlinks pooled segments, largest first, until ``needed`` bytes are freed."""
        freed = 0
        self._free.sort()
        while self._free and freed < needed:
            size, name = self._free.pop()
            shm.unlink_segment(name)
            self.bytes -= size
            freed += size
        return freed
