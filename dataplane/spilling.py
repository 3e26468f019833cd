"""Spilling: when the store is full, objects no pending task uses are copied to this
node's spill directory (oldest first) and their segments freed, instead of refusing
the new object; a spilled object is restored into the store when something here waits
for it, as Ray does. What it does is reported (``record``: ``spilled``, ``restored``),
and the node daemon writes it in the log; this module does not know the log.

The same path brings back the copy of a durable put (``load_file``). Objects left on
another node are not this module's: the cluster link fetches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from dataplane import protocol as p
from dataplane import shm
from dataplane.object_table import Elsewhere, ObjectTable
from dataplane.serialization import SerializationError, verify
from dataplane.store_memory import StoreMemory

log = logging.getLogger("cairn.node")
# how often a spilled object that could not be restored for a failed spill is tried again
RESTORE_RETRY_S = 1.0
# a full store whose only spill candidates are values whose events are on their way to
# the log (a put just made) waits for them this long at most, looking this often
BECOMING_READY_WAIT_S = 10.0
BECOMING_READY_POLL_S = 0.005


class Spiller:
    """Moves objects between the store and the spill directory. Owns which objects are
    being copied out or read back, and why the last attempt to make room failed."""

    def __init__(
        self,
        node_id: str,
        spill_dir: Path,
        objects: ObjectTable,
        memory: StoreMemory,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        record: Callable[[str, str, dict[str, Any]], None],
        on_lost: Callable[[str, str], None],
        on_restored: Callable[[], None],
    ) -> None:
        """``record(object_id, event_type, payload)``: what to write in the log;
        ``on_lost(object_id, why)``: a spilled copy could not be read back;
        ``on_restored()``: an object is in the store again (tasks may wait for it)."""
        self._node_id = node_id
        self.spill_dir = spill_dir
        self._objects = objects
        self._memory = memory
        self._spawn = spawn
        self._record = record
        self._on_lost = on_lost
        self._on_restored = on_restored
        self._spilling: set[str] = set()  # objects being copied out (not chosen twice)
        self._restoring: set[str] = set()
        # why the last make_room that returned False could not spill (the disk under the
        # spill directory is full, ...); None when there was simply nothing to spill
        self._failure: str | None = None

    def store_full(self, size: int) -> str:
        why = self._failure or self._memory.failure or "no more can be spilled"
        return (
            f"store_full: the object store cannot fit {size:,} bytes: "
            f"{self._objects.used:,} of {self._objects.capacity:,} bytes are in use "
            f"(object_store_memory) and {why}"
        )

    async def make_room(self, size: int) -> tuple[int, int] | None:
        """Room for ``size`` bytes in the store (``StoreMemory.take``), spilling
        objects to disk while it is full (or too fragmented for one range that large);
        None if even spilling everything spillable would not make room, or if a spill
        failed (``store_full`` says why). A failed spill ends the attempt: retrying it
        at once would spin on a full disk; the next request tries again, so work
        spills again as soon as space is freed. Values whose events are still on their
        way to the log (puts just made: ready, and spillable, once they are durable) are
        waited for, up to ``BECOMING_READY_WAIT_S``: a writer faster than the log's
        commits is not refused for them."""
        waited_since: float | None = None
        while (where := self._memory.take(size)) is None:
            # full: the overflow goes; not full, but no free range is that large
            # (fragmented): the oldest objects go, one by one, until one is
            overflow = self._objects.used + size - self._objects.capacity
            if overflow > 0:
                victims = self._objects.spill_candidates(overflow, self._spilling)
            else:  # the oldest goes, one at a time, until a range is large enough
                victims = self._objects.spill_candidates(size, self._spilling, partial=True)[:1]
            if not victims:
                now = time.monotonic()
                waited_since = now if waited_since is None else waited_since
                if (
                    self._objects.becoming_spillable(self._spilling)
                    and now - waited_since < BECOMING_READY_WAIT_S
                ):
                    await asyncio.sleep(BECOMING_READY_POLL_S)
                    continue
                self._failure = None
                return None
            # taken now, before the copies start: another make_room running meanwhile
            # must not pick them too (its copy, finding the object spilled already,
            # would delete the file this one made)
            self._spilling.update(v.object_id for v in victims)
            failures = await asyncio.gather(*(self._spill(v) for v in victims))
            failed = [why for why in failures if why is not None]
            if failed:
                self._failure = failed[0]
                return None
        return where

    async def _spill(self, location: p.ObjectLocation) -> str | None:
        """Copies an object to the spill directory and frees its range; on failure
        (ENOSPC, EIO...) the object stays in the store, the partial copy is removed,
        and the returned text names the directory and the cause."""
        object_id = location.object_id
        self._spilling.add(object_id)  # (by make_room already, which chose it)
        path = self.spill_dir / object_id
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            # (freed meanwhile, its range reused: the copy differs, and is dropped below)
            await asyncio.to_thread(copy_out, self._node_id, location, path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # a half-written copy must not stay
                path.unlink(missing_ok=True)
            cause = os.strerror(exc.errno) if exc.errno else str(exc)
            log.warning("could not spill object %s to %s: %s", object_id, self.spill_dir, exc)
            return f"spilling to {self.spill_dir} failed: {cause}"
        finally:
            self._spilling.discard(object_id)
        if self._objects.stored(object_id) != location:  # freed or changed meanwhile
            path.unlink(missing_ok=True)
            return None
        bare = p.ObjectLocation(object_id, size=location.size, contained=location.contained)
        self._objects.set_elsewhere(object_id, Elsewhere("spilled", str(path), bare))
        self._memory.free_location(location)
        self._record(object_id, "spilled", {"size_bytes": location.size, "path": str(path)})
        return None

    def restore(self, object_id: str, where: Elsewhere) -> None:
        """Something here waits for a spilled object: it is read back (once)."""
        if object_id not in self._restoring:
            self._restoring.add(object_id)
            self._spawn(self._restore(object_id, where))

    async def _restore(self, object_id: str, where: Elsewhere) -> None:
        size = where.location.size
        try:
            location = await self.load_file(object_id, Path(where.where), size)
        except OSError as exc:  # the copy is gone or damaged: lost, rebuilt if it can be
            self._on_lost(object_id, f"its spilled copy could not be read back: {exc}")
            return
        finally:
            self._restoring.discard(object_id)
        if location is None and self._failure is not None:
            # room would be made by spilling others, and that failed (a full disk):
            # this object's copy is intact, so it stays spilled and its readers wait
            # (up to their get timeout) for a retry, rather than losing it
            log.warning(
                "spilled object %s waits to be restored (retried every %gs): %s",
                object_id,
                RESTORE_RETRY_S,
                self.store_full(size).removeprefix("store_full: "),
            )
            self._restoring.add(object_id)
            self._spawn(self._restore_later(object_id, where))
            return
        if location is None:
            message = f"spilled object {object_id} cannot be restored: " + self.store_full(
                size
            ).removeprefix("store_full: ")
            self._objects.ready(p.ObjectLocation(object_id, error=p.ErrorInfo("system", message)))
            Path(where.where).unlink(missing_ok=True)
            return
        if self._objects.state(object_id) != "spilled":  # freed meanwhile
            self._memory.give_back(location.region or 0, location.offset, size)
            return
        self._record(object_id, "restored", {"size_bytes": size})
        restored = dataclasses.replace(
            where.location, region=location.region, offset=location.offset
        )
        self._objects.ready(restored)
        Path(where.where).unlink(missing_ok=True)
        self._on_restored()

    async def _restore_later(self, object_id: str, where: Elsewhere) -> None:
        """Tries a restore again after a pause, if the object is still spilled and
        still wanted (space may have been freed on disk or in the store meanwhile)."""
        try:
            await asyncio.sleep(RESTORE_RETRY_S)
        finally:
            self._restoring.discard(object_id)
        if self._objects.state(object_id) == "spilled" and self._objects.is_wanted(object_id):
            self.restore(object_id, where)

    async def load_file(self, object_id: str, path: Path, size: int) -> p.ObjectLocation | None:
        """A copy of an object on disk (spilled, or a durable put) read into the store,
        room made first; None if no room can be made; OSError (nothing left behind) if
        the file cannot be read whole, or its bytes do not match their checksum."""
        where = await self.make_room(size)
        if where is None:
            return None
        location = p.ObjectLocation(object_id, region=where[0], offset=where[1], size=size)
        try:
            await asyncio.to_thread(copy_in, self._node_id, path, location)
        except OSError:
            self._memory.give_back(*where, size)
            raise
        return location


class DamagedCopyError(OSError):
    """A copy on disk whose bytes do not match the object's checksum."""


def copy_out(prefix: str, location: p.ObjectLocation, path: Path) -> None:
    """Writes an object's bytes to a file (a spill, a durable put's copy), its deferred
    checksum computed first so that whoever reads the file back can check it."""
    shm.seal_object(prefix, location)
    view = shm.object_view(prefix, location)
    try:
        with open(path, "wb") as out:
            out.write(view)
    finally:
        view.release()


def copy_in(prefix: str, source: Path, location: p.ObjectLocation) -> None:
    """Reads a file into an object's range of the store and checks it against the
    object's checksum (DamagedCopyError: the disk gave back other bytes than were
    written); OSError if the file does not hold the object whole."""
    size = location.size
    view = shm.object_view(prefix, location, writable=True)
    try:
        with open(source, "rb") as src:
            got = src.readinto(view)
            if got != size or src.read(1):
                held = f"{got:,}" if got != size else f"more than {size:,}"
                raise OSError(f"{source} holds {held} bytes, not {size:,}")
        try:
            verify(view)
        except SerializationError as exc:
            raise DamagedCopyError(
                f"object {location.object_id}'s bytes do not match their checksum: "
                f"its copy {source} is damaged: {exc}"
            ) from None
    finally:
        view.release()
