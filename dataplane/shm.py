"""The node's store as one process sees it: objects larger than ``INLINE_LIMIT`` live
at ranges of a few large shared-memory regions in /dev/shm (dataplane/arena.py), which
each process of the node maps once, the first time it meets an object there, and
keeps. Writing an object is a copy into pages already mapped; reading one is a view of
them (the kernel shares the pages: no copy).

Which ranges are free is the node daemon's to say (dataplane/store_memory.py): a
writer writes only into a range the daemon handed it, and a range is handed out again
only after the daemon freed its object, which it does only once no process holds it
(a reader holds an object as long as anything built on its bytes lives)."""

from __future__ import annotations

import contextlib
import ctypes
import threading

from dataplane import protocol as p
from dataplane.arena import SHM_DIR, ArenaMappings, ArenaRegion
from dataplane.serialization import Serialized, seal

__all__ = ["INLINE_LIMIT", "SHM_DIR", "ObjectBytesGoneError"]

# Objects at most this large travel inline in messages instead of in the store (Ray's
# max_direct_call_object_size is 100 KiB as well).
INLINE_LIMIT = 100 * 1024

_mappings: dict[str, ArenaMappings] = {}
_mappings_lock = threading.Lock()
_populate = True  # (the node daemon maps lazily: see map_lazily)


class ObjectBytesGoneError(OSError):
    """An object's region cannot be mapped (removed behind the store's back, or too
    short for the object)."""


def map_lazily() -> None:
    """This process maps regions without populating them: the node daemon, which touches
    little of a region (a checksum, a spill, a transfer's chunks) and whose event loop
    must not stall while a large region's pages are mapped."""
    global _populate
    _populate = False


def mappings(prefix: str) -> ArenaMappings:
    """This process's mappings of the regions of the node whose prefix is ``prefix``."""
    found = _mappings.get(prefix)
    if found is None:
        with _mappings_lock:
            found = _mappings.setdefault(prefix, ArenaMappings(prefix, populate=_populate))
    return found


def forget(prefix: str) -> None:
    """This process is done with that node (its client shut down): the mappings go,
    once nothing built on them lives, so its regions' memory is given back."""
    with _mappings_lock:
        found = _mappings.pop(prefix, None)
    if found is not None:
        found.close()


def object_view(prefix: str, location: p.ObjectLocation, *, writable: bool = False) -> memoryview:
    """The object's bytes, as a view of this process's mapping of its region."""
    region = _region_of(prefix, location)
    try:
        return region.view(location.offset, location.size, writable=writable)
    except ValueError as exc:
        raise _gone(location, exc) from None


def tracked_bytes(prefix: str, location: p.ObjectLocation) -> ctypes.Array[ctypes.c_char]:
    """The object's bytes as an object that lives as long as anything built on them
    (see ArenaRegion.tracked): its reader holds the object until it goes."""
    region = _region_of(prefix, location)
    try:
        return region.tracked(location.offset, location.size)
    except ValueError as exc:
        raise _gone(location, exc) from None


def _region_of(prefix: str, location: p.ObjectLocation) -> ArenaRegion:
    """This process's mapping of the region holding an object in the store."""
    assert location.region is not None  # an object in the store
    try:
        return mappings(prefix).region(location.region)
    except (OSError, ValueError) as exc:
        raise _gone(location, exc) from None


def _gone(location: p.ObjectLocation, exc: Exception) -> ObjectBytesGoneError:
    return ObjectBytesGoneError(
        f"the store region {location.region} holding it cannot be read: {exc}"
    )


def write_object(prefix: str, location: p.ObjectLocation, value: Serialized) -> None:
    """Writes a serialized value into the range the daemon reserved for it."""
    view = object_view(prefix, location, writable=True)
    try:
        value.write_into(view)
    finally:
        view.release()


def seal_object(prefix: str, location: p.ObjectLocation) -> bool:
    """Computes the deferred checksum of an object's blob (see serialization.seal)
    before its bytes leave this node's memory (sent, spilled, copied to disk); True if
    it was deferred."""
    view = object_view(prefix, location, writable=True)
    try:
        return seal(view)
    finally:
        view.release()


def unlink_all(prefix: str) -> int:
    """Removes every region of a node (at shutdown, or after a crash)."""
    removed = 0
    if not prefix:
        return 0
    for path in SHM_DIR.glob(f"{prefix}-*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed
