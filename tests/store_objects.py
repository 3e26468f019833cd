"""Where an object lies in its node's store (the arena's region file, the offset and the
size of its bytes), as a driver of that node sees it, and damage done to those bytes
behind the node's back (as bad memory would)."""

from __future__ import annotations

import os
from pathlib import Path

from dataplane import shm
from dataplane.arena import region_name
from sdk import runtime


def object_bytes(ref: object) -> tuple[Path, int, int]:
    """(the region's file, the offset, the size) of the object of ``ref``, once ready."""
    client = runtime.client_or_auto_init()
    (location,) = client.get_locations([ref.hex()], timeout=60)  # type: ignore[attr-defined]
    assert location.region is not None, f"{ref} is not in the store (inline or elsewhere)"
    path = shm.SHM_DIR / region_name(client.welcome.node_id, location.region)
    return path, location.offset, location.size


def flip(ref: object, at: int, count: int = 1, mask: int = 0x5A) -> None:
    """Flips bits (``mask``) of ``count`` of the object's bytes from ``at`` on (its
    framing when ``at`` is 0, its value further in)."""
    path, offset, size = object_bytes(ref)
    assert at >= 0 and at + count <= size
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, count, offset + at)
        os.pwrite(fd, bytes(b ^ mask for b in old), offset + at)
    finally:
        os.close(fd)
