"""Spilling: when the store is full, objects no pending task uses are copied to this
node's spill directory (oldest first) and their segments freed, instead of refusing
the new object; a spilled object is restored into the store when something here waits
for it, as Ray does. The log records both (``spilled``, ``restored`` on the object).

Objects whose bytes are not in the store -- spilled here, or left on the node that
made them -- are brought back the same way (``_bring_back``) and let go the same way
when freed (``_drop_elsewhere``). A mixin of NodeDaemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import mmap
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

from controlplane.eventlog import EntityKind, Event
from controlplane.node import transfer
from controlplane.node.objects import Elsewhere
from dataplane import protocol as p
from dataplane import shm
from dataplane.serialization import SerializationError, verify

log = logging.getLogger("cairn.node")
K = EntityKind
# how often a spilled object that could not be restored for a failed spill is tried again
RESTORE_RETRY_S = 1.0


class SpillingMixin:
    spill_dir: Path
    spilling_now: set[str]  # objects being copied out (not chosen twice)
    restoring: set[str]
    # why the last _make_room that returned False could not spill (the disk under the
    # spill directory is full, ...); None when there was simply nothing left to spill
    spill_failure: str | None = None

    def _store_full(self: Any, size: int) -> str:
        why = self.spill_failure or "no more can be spilled"
        return (
            f"store_full: the object store cannot fit {size:,} bytes: "
            f"{self.objects.used:,} of {self.objects.capacity:,} bytes are in use "
            f"(object_store_memory) and {why}"
        )

    async def _make_room(self: Any, size: int) -> bool:
        """Charges ``size`` bytes to the store, spilling objects to disk while it is
        full; False if even spilling everything spillable would not make room, or if a
        spill failed (``spill_failure`` says why). A failed spill ends the attempt:
        retrying it at once would spin on a full disk; the next request tries again,
        so work spills again as soon as space is freed."""
        while not self.objects.charge(size):
            overflow = self.objects.used + self.pool.bytes + size - self.objects.capacity
            if self.pool.bytes:
                self.pool.evict(overflow)
                continue
            victims = self.objects.spill_candidates(overflow, self.spilling_now)
            if not victims:
                self.spill_failure = None
                return False
            failures = await asyncio.gather(*(self._spill_object(v) for v in victims))
            failed = [why for why in failures if why is not None]
            if failed:
                self.spill_failure = failed[0]
                return False
        return True

    async def _spill_object(self: Any, location: p.ObjectLocation) -> str | None:
        """Copies an object to the spill directory and frees its segment; on failure
        (ENOSPC, EIO...) the object stays in the store, the partial copy is removed,
        and the returned text names the directory and the cause."""
        object_id, name = location.object_id, location.shm_name
        assert name is not None
        self.spilling_now.add(object_id)
        path = self.spill_dir / object_id
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(shm.seal_segment, name)  # restore checks the copy
            await asyncio.to_thread(shutil.copyfile, shm.SHM_DIR / name, path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # a half-written copy must not stay
                path.unlink(missing_ok=True)
            cause = os.strerror(exc.errno) if exc.errno else str(exc)
            log.warning("could not spill object %s to %s: %s", object_id, self.spill_dir, exc)
            return f"spilling to {self.spill_dir} failed: {cause}"
        finally:
            self.spilling_now.discard(object_id)
        if self.objects.stored(object_id) != location:  # freed or changed meanwhile
            path.unlink(missing_ok=True)
            return None
        bare = p.ObjectLocation(object_id, size=location.size, contained=location.contained)
        self.objects.set_elsewhere(object_id, Elsewhere("spilled", str(path), bare))
        shm.unlink_segment(name)
        self._log(
            [
                Event(
                    K.OBJECT,
                    object_id,
                    "spilled",
                    {"size_bytes": location.size, "path": str(path)},
                    node_id=self.node_id,
                )
            ]
        )
        return None

    def _bring_back(self: Any, object_id: str, where: Elsewhere) -> None:
        """Something here waits for an object whose bytes are not in the store."""
        if where.kind == "remote":
            self._fetch_remote(object_id, where.where)
        elif object_id not in self.restoring:
            self.restoring.add(object_id)
            self._spawn(self._restore(object_id, where))

    async def _restore(self: Any, object_id: str, where: Elsewhere) -> None:
        size = where.location.size
        try:
            location = await self._load_file(object_id, Path(where.where), size)
        except OSError as exc:  # the copy is gone or damaged: lost, rebuilt if it can be
            why = f"its spilled copy could not be read back: {exc}"
            self._object_lost(object_id, why, needed=True)
            return
        finally:
            self.restoring.discard(object_id)
        if location is None and self.spill_failure is not None:
            # room would be made by spilling others, and that failed (a full disk):
            # this object's copy is intact, so it stays spilled and its readers wait
            # (up to their get timeout) for a retry, rather than losing it
            log.warning(
                "spilled object %s waits to be restored (retried every %gs): %s",
                object_id,
                RESTORE_RETRY_S,
                self._store_full(size).removeprefix("store_full: "),
            )
            self.restoring.add(object_id)
            self._spawn(self._restore_later(object_id, where))
            return
        if location is None:
            message = f"spilled object {object_id} cannot be restored: " + self._store_full(
                size
            ).removeprefix("store_full: ")
            self.objects.ready(p.ObjectLocation(object_id, error=p.ErrorInfo("system", message)))
            Path(where.where).unlink(missing_ok=True)
            return
        if self.objects.state(object_id) != "spilled":  # freed meanwhile
            self.objects.uncharge(size)
            shm.unlink_segment(location.shm_name or "")
            return
        self._log(
            [Event(K.OBJECT, object_id, "restored", {"size_bytes": size}, node_id=self.node_id)]
        )
        self.objects.ready(dataclasses.replace(where.location, shm_name=location.shm_name))
        Path(where.where).unlink(missing_ok=True)
        self._schedule()

    async def _restore_later(self: Any, object_id: str, where: Elsewhere) -> None:
        """Tries a restore again after a pause, if the object is still spilled and
        still wanted (space may have been freed on disk or in the store meanwhile)."""
        try:
            await asyncio.sleep(RESTORE_RETRY_S)
        finally:
            self.restoring.discard(object_id)
        if self.objects.state(object_id) == "spilled" and self.objects.is_wanted(object_id):
            self._bring_back(object_id, where)

    async def _load_file(self: Any, object_id: str, path: Path, size: int) -> Any:
        """A copy of an object on disk (spilled, or a durable put) read into a new segment
        of the store, room made first; None if no room can be made; OSError (nothing
        left behind) if the file cannot be read whole."""
        if not await self._make_room(size):
            return None
        name = shm.segment_name(self.node_id, object_id)
        try:
            await asyncio.to_thread(copy_into_segment, path, name, size)
        except OSError:
            self.objects.uncharge(size)
            raise
        return p.ObjectLocation(object_id, shm_name=name, size=size)

    def _drop_elsewhere(self: Any, object_id: str, where: Elsewhere) -> None:
        """A freed object's copy outside the store goes too."""
        if where.kind == "remote":
            self._spawn(transfer.release(where.where, object_id))
        else:
            with contextlib.suppress(OSError):
                os.unlink(where.where)
            self._log([Event(K.OBJECT, object_id, "freed", {}, node_id=self.node_id)])


class DamagedCopyError(OSError):
    """A copy on disk whose bytes do not match the object's checksum."""


def copy_into_segment(source: Path, name: str, size: int) -> None:
    """Copies a file into a new segment and checks it against the object's checksum
    (DamagedCopyError: the disk gave back other bytes than were spilled); nothing is
    left behind when it fails."""
    fd, staging = shm.create_staging(name)
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb+") as dst:
            _copy_checked(source, src, dst, size)
        shm.publish(staging, name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise


def _copy_checked(source: Path, src: BinaryIO, dst: BinaryIO, size: int) -> None:
    """Copies and verifies (DamagedCopyError when the bytes do not match)."""
    shutil.copyfileobj(src, dst, length=1024 * 1024)
    if dst.tell() != size:
        raise OSError(f"{source} holds {dst.tell():,} bytes, not {size:,}")
    dst.flush()
    with mmap.mmap(dst.fileno(), size, prot=mmap.PROT_READ) as mapping:
        view = memoryview(mapping)
        try:
            verify(view)
        except SerializationError as exc:
            object_id = source.name
            raise DamagedCopyError(
                f"object {object_id}'s bytes do not match their checksum: "
                f"its copy {source} is damaged: {exc}"
            ) from None
        finally:
            view.release()
