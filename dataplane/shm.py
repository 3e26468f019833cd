"""Shared-memory segments that hold objects: one POSIX shared-memory file per object in
/dev/shm, named after the session and the object, written once by its creator and then
mapped read-only by every reader (the kernel shares the pages: no copy)."""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from pathlib import Path

from dataplane.serialization import Serialized, seal

SHM_DIR = Path("/dev/shm")
# Objects at most this large travel inline in messages instead of in a segment (Ray's
# max_direct_call_object_size is 100 KiB as well).
INLINE_LIMIT = 100 * 1024


def segment_name(prefix: str, object_id: str) -> str:
    return f"{prefix}-{object_id}"


def write_segment(name: str, value: Serialized, size: int, reuse: str | None = None) -> None:
    """Creates the segment ``name`` of ``size`` bytes and writes the blob into it.

    The blob is written under a staging name and then renamed to ``name``: a reader
    never opens a half-written segment, and a segment left under ``name`` by an attempt
    killed while writing (the task is retried on this node) is replaced, not refused.
    ``reuse`` names a recycled segment (one of a freed object, handed out by the node
    daemon, so no other process writes it): it is the staging file, and its pages,
    already allocated, need no zeroing or faulting in."""
    staging = fd = None
    if reuse is not None:
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(SHM_DIR / reuse, os.O_RDWR)
            staging = SHM_DIR / reuse
    if fd is None or staging is None:
        fd, staging = create_staging(name)
    try:
        os.ftruncate(fd, size)
        # Allocate every page at once and map them populated: much cheaper than
        # faulting fresh tmpfs pages in one by one while copying (1.5 vs 1.0 GB/s here).
        os.posix_fallocate(fd, 0, size)
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE) as target:
            view = memoryview(target)
            try:
                value.write_into(view)
            finally:
                view.release()
        publish(staging, name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
    finally:
        os.close(fd)


def create_staging(name: str) -> tuple[int, Path]:
    """A new file, private to its writer, to write segment ``name`` into before
    ``publish`` gives it that name. It is under the session's prefix, so one left by a
    writer killed midway goes with the session (unlink_all)."""
    staging = SHM_DIR / f"{name}-staging-{os.getpid()}-{secrets.token_hex(4)}"
    return os.open(staging, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600), staging


def publish(staging: Path, name: str) -> None:
    """Gives a written segment its name, atomically: readers see all of it or nothing,
    and it replaces a segment an attempt killed while writing left under that name."""
    os.rename(staging, SHM_DIR / name)


def map_segment(name: str, size: int) -> mmap.mmap:
    """The segment, mapped read-only; the mapping lives as long as views of it do."""
    fd = os.open(SHM_DIR / name, os.O_RDONLY)
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise SegmentTruncatedError(
                f"segment {name} is truncated: {actual:,} of {size:,} bytes"
            )
        return mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


class SegmentTruncatedError(OSError):
    """A segment holds fewer bytes than its object (cut short behind the store's back)."""


def recycle_segment(name: str, new_name: str) -> bool:
    """Keeps a freed object's segment under a pool name for reuse; False if gone."""
    try:
        os.rename(SHM_DIR / name, SHM_DIR / new_name)
    except FileNotFoundError:
        return False
    return True


def unlink_segment(name: str) -> None:
    """Removes the segment's name; readers that still map it keep their pages."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SHM_DIR / name)


def unlink_all(prefix: str) -> int:
    """Removes every segment of a session (at shutdown, or after a crash)."""
    removed = 0
    if not prefix:
        return 0
    for path in SHM_DIR.glob(f"{prefix}-*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def seal_segment(name: str) -> bool:
    """Computes the deferred checksum of a segment's blob (see serialization.seal)
    before its bytes leave this node's memory (sent, spilled, copied to disk); True if
    it was deferred. A segment that is gone is left to the caller's own read to report."""
    try:
        fd = os.open(SHM_DIR / name, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return False
        with mmap.mmap(fd, size) as mapping:
            view = memoryview(mapping)
            try:
                return seal(view)
            finally:
                view.release()
    finally:
        os.close(fd)
