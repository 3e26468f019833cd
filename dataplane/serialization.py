"""Serialization of values into one contiguous blob that can live in shared memory and
be read back without copying.

cloudpickle protocol 5 with out-of-band buffers: large buffers (NumPy arrays, Arrow
buffers, bytes-like objects that support PickleBuffer) are not copied into the pickle
stream but laid out after it, 64-byte aligned. Reading a blob that sits in a read-only
memory map hands those buffers to pickle as views of the map, so a NumPy array comes
back backed by the shared memory, read-only, with no copy.

Layout (little-endian):

    magic "CRN1" | u32 buffer count n | u64 pickle length
    n x (u64 offset, u64 length)       -- offsets from the start of the blob
    pickle bytes | padding | buffer 0 | padding | buffer 1 ...
"""

from __future__ import annotations

import pickle
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle

MAGIC = b"CRN1"
_HEADER = struct.Struct("<4sIQ")
_ENTRY = struct.Struct("<QQ")
ALIGNMENT = 64


class SerializationError(TypeError):
    """A value could not be pickled (the message names its type), or a blob is not one
    this module wrote (truncated or corrupted)."""


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass
class Serialized:
    """A value ready to be written: the pickle stream and its out-of-band buffers."""

    pickled: bytes
    buffers: list[memoryview]

    def layout(self) -> tuple[int, list[tuple[int, int]]]:
        """Total size and (offset, length) of every buffer."""
        offset = _HEADER.size + _ENTRY.size * len(self.buffers) + len(self.pickled)
        entries = []
        for buf in self.buffers:
            offset = _align(offset)
            entries.append((offset, buf.nbytes))
            offset += buf.nbytes
        return offset, entries

    @property
    def total_size(self) -> int:
        return self.layout()[0]

    def write_into(self, target: memoryview) -> None:
        """Writes the blob into ``target`` (at least ``total_size`` bytes)."""
        size, entries = self.layout()
        if target.nbytes < size:
            raise ValueError(f"target has {target.nbytes} bytes, blob needs {size}")
        _HEADER.pack_into(target, 0, MAGIC, len(self.buffers), len(self.pickled))
        pos = _HEADER.size
        for entry in entries:
            _ENTRY.pack_into(target, pos, *entry)
            pos += _ENTRY.size
        target[pos : pos + len(self.pickled)] = self.pickled
        for (offset, length), buf in zip(entries, self.buffers, strict=True):
            target[offset : offset + length] = buf.cast("B") if buf.format != "B" else buf

    def to_bytes(self) -> bytes:
        out = bytearray(self.total_size)
        self.write_into(memoryview(out))
        return bytes(out)


_contained = threading.local()


def note_contained_ref(object_id: str) -> None:
    """Called by ObjectRef's reducer: records a ref serialized inside a value."""
    found = getattr(_contained, "refs", None)
    if found is not None:
        found.append(object_id)


def serialize_with_refs(value: Any) -> tuple[Serialized, tuple[str, ...]]:
    """Serializes ``value`` and returns the ids of the ObjectRefs found inside it."""
    outer = getattr(_contained, "refs", None)
    _contained.refs = []
    try:
        serialized = serialize(value)
        return serialized, tuple(dict.fromkeys(_contained.refs))
    finally:
        _contained.refs = outer


def serialize(value: Any, *, inband_limit: int = 4096) -> Serialized:
    """Pickles ``value``; buffers larger than ``inband_limit`` go out of band.

    Raises :class:`SerializationError` naming the type that could not be pickled."""
    buffers: list[memoryview] = []

    def keep_out_of_band(buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes <= inband_limit:
            return True  # in band: small buffers are cheaper inside the stream
        buffers.append(view)
        return False

    try:
        pickled = cloudpickle.dumps(value, protocol=5, buffer_callback=keep_out_of_band)
    except Exception as exc:
        raise SerializationError(
            f"could not serialize a value of type {type(value).__module__}."
            f"{type(value).__qualname__}: {type(exc).__name__}: {exc}"
        ) from exc
    return Serialized(pickled, buffers)


def deserialize(blob: memoryview | bytes, *, loads: Callable[..., Any] = pickle.loads) -> Any:
    """Rebuilds a value from a blob; out-of-band buffers are views of ``blob``."""
    view = memoryview(blob)
    if view.nbytes < _HEADER.size:
        raise SerializationError(f"object blob truncated: {view.nbytes} bytes")
    magic, count, pickle_len = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise SerializationError(f"not a serialized object (magic {bytes(magic)!r})")
    pos = _HEADER.size
    entries = []
    for _ in range(count):
        entries.append(_ENTRY.unpack_from(view, pos))
        pos += _ENTRY.size
    end = pos + pickle_len
    if end > view.nbytes or any(off + n > view.nbytes for off, n in entries):
        raise SerializationError("object blob truncated: its header points past its end")
    buffers = [view[off : off + n] for off, n in entries]
    return loads(view[pos:end], buffers=buffers)
