"""Serialization of values into one contiguous blob that can live in shared memory and
be read back without copying.

cloudpickle protocol 5 with out-of-band buffers: large buffers (NumPy arrays, Arrow
buffers, bytes-like objects that support PickleBuffer) are not copied into the pickle
stream but laid out after it, 64-byte aligned. Reading a blob that sits in a read-only
memory map hands those buffers to pickle as views of the map, so a NumPy array comes
back backed by the shared memory, read-only, with no copy.

Layout (little-endian):

    magic "crn2" | u32 buffer count n | u64 pickle length | u64 checksum
    n x (u64 offset, u64 length)       -- offsets from the start of the blob
    pickle bytes | padding | buffer 0 | padding | buffer 1 ...

The checksum (xxh3-64) covers every byte written but the padding and itself: the
header's first 16 bytes, the entries, the pickle and the buffers, in that order. It is
computed while the blob is written, chunk by chunk on bytes still in the cache (crc32
would cost 3x a put of large arrays here; xxh3 about 8% of the copy), and checked by
``verify`` (see ``deserialize``). ``$CAIRN_OBJECT_CHECKSUMS=0`` writes the old layout,
"CRN1" (no checksum field), which readers still accept: put values in older logs have
it. The two magics differ in every byte, so no single damaged byte turns a checked blob
into an unchecked one.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cloudpickle
import xxhash

MAGIC = b"crn2"  # with a checksum
MAGIC_UNCHECKED = b"CRN1"  # without: $CAIRN_OBJECT_CHECKSUMS=0, or blobs of older logs
# with a checksum field not computed yet: a large blob, whose checksum its node computes
# (``seal``) before its bytes first leave the node's memory (see verify_read_max_bytes)
MAGIC_DEFERRED = b"crn3"
_HEADER = struct.Struct("<4sIQ")
_CHECKSUM = struct.Struct("<Q")  # after _HEADER, in blobs with MAGIC
_ENTRY = struct.Struct("<QQ")
ALIGNMENT = 64
# Blobs are copied (and hashed) in pieces of this size: each piece is hashed while it
# is still in the CPU's cache, so the checksum adds no second pass over memory.
_CHUNK = 1 << 20


# Objects in a node's shared memory up to this size are checked against their checksum
# on every read; larger ones are not (a check is a pass over the object, which a
# zero-copy read otherwise never makes): their bytes are checked where they cross a
# boundary instead (pulled from another node, restored from spill or a durable copy).
# So a blob larger than this is written without hashing it (MAGIC_DEFERRED), which
# keeps a put of large arrays at the speed of the copy; its node seals it (computes the
# checksum into its header) before it is sent, spilled or copied to disk.
# $CAIRN_VERIFY_READ_MAX_BYTES changes it ("inf": every read; 0: only inline values).
_VERIFY_READ_MAX_BYTES = 16 * 1024 * 1024


def verify_read_max_bytes() -> float:
    """The size up to which local reads verify checksums (see above)."""
    raw = os.environ.get("CAIRN_VERIFY_READ_MAX_BYTES")
    if raw is None:
        return _VERIFY_READ_MAX_BYTES
    try:
        return float(raw)
    except ValueError:
        raise ValueError(
            f"$CAIRN_VERIFY_READ_MAX_BYTES must be a number of bytes, not {raw!r}"
        ) from None


def checksums_enabled() -> bool:
    """Whether new blobs carry a checksum ($CAIRN_OBJECT_CHECKSUMS, on unless "0")."""
    return os.environ.get("CAIRN_OBJECT_CHECKSUMS", "1") != "0"


class SerializationError(TypeError):
    """A value could not be pickled (the message names its type), or a blob is not one
    this module wrote (truncated or corrupted)."""


class ChecksumError(SerializationError):
    """A blob's bytes differ from those it was written with (damaged in the store, on
    disk or on the way): never deserialized, so never a wrong value."""


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass
class Serialized:
    """A value ready to be written: the pickle stream and its out-of-band buffers."""

    pickled: bytes
    buffers: list[memoryview]
    checksum: bool = field(default_factory=checksums_enabled)
    # the checksum write_into computed while writing (None: it wrote none, or deferred it)
    written_checksum: int | None = field(default=None, compare=False, repr=False)

    def _header_size(self) -> int:
        return _HEADER.size + (_CHECKSUM.size if self.checksum else 0)

    def layout(self) -> tuple[int, list[tuple[int, int]]]:
        """Total size and (offset, length) of every buffer."""
        offset = self._header_size() + _ENTRY.size * len(self.buffers) + len(self.pickled)
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
        """Writes the blob into ``target`` (at least ``total_size`` bytes), hashing
        what it writes as it goes (see the module's docstring)."""
        size, entries = self.layout()
        if target.nbytes < size:
            raise ValueError(f"target has {target.nbytes} bytes, blob needs {size}")
        deferred = self.checksum and size > verify_read_max_bytes()
        magic = MAGIC_DEFERRED if deferred else MAGIC if self.checksum else MAGIC_UNCHECKED
        _HEADER.pack_into(target, 0, magic, len(self.buffers), len(self.pickled))
        pos = self._header_size()
        for entry in entries:
            _ENTRY.pack_into(target, pos, *entry)
            pos += _ENTRY.size
        if deferred:
            _CHECKSUM.pack_into(target, _HEADER.size, 0)
        digest = xxhash.xxh3_64() if self.checksum and not deferred else None
        if digest is not None:
            digest.update(target[: _HEADER.size])
            digest.update(target[_HEADER.size + _CHECKSUM.size : pos])
        _copy(target, pos, memoryview(self.pickled), digest)
        for (offset, _length), buf in zip(entries, self.buffers, strict=True):
            _copy(target, offset, buf.cast("B") if buf.format != "B" else buf, digest)
        if digest is not None:
            self.written_checksum = digest.intdigest()
            _CHECKSUM.pack_into(target, _HEADER.size, self.written_checksum)

    def value_checksum(self) -> int:
        """The checksum a checked blob of this value carries: the one ``write_into``
        computed if it did, else computed now from the value (one pass over it), as a
        deferred or unchecked blob's would be once sealed. Equal values, equal checksums."""
        if self.written_checksum is not None:
            return self.written_checksum
        checked = Serialized(self.pickled, self.buffers, checksum=True)
        _, entries = checked.layout()
        digest = xxhash.xxh3_64(_HEADER.pack(MAGIC, len(self.buffers), len(self.pickled)))
        for entry in entries:
            digest.update(_ENTRY.pack(*entry))
        digest.update(self.pickled)
        for buf in self.buffers:
            view = buf.cast("B") if buf.format != "B" else buf
            for piece in range(0, view.nbytes, _CHUNK):
                digest.update(view[piece : piece + _CHUNK])
        return digest.intdigest()

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


# Serializers registered in this process (ray.util.register_serializer): type -> reducer.
# The deserializer travels with each value (pickled by value), so a reader needs none.
_custom_reducers: dict[type, Callable[[Any], tuple[Any, ...]]] = {}


class _CustomPickler(cloudpickle.Pickler):
    """cloudpickle with the registered serializers first (the table is read when a
    pickler is made, so it is the class's)."""

    dispatch_table: ClassVar[collections.ChainMap[Any, Any]] = collections.ChainMap(
        _custom_reducers, cloudpickle.Pickler.dispatch_table
    )


def register_reducer(
    cls: type, serializer: Callable[[Any], Any], deserializer: Callable[[Any], Any]
) -> None:
    """Values of ``cls`` are written as ``serializer(value)`` and read back with
    ``deserializer`` from now on, in this process's writes."""
    _custom_reducers[cls] = lambda value: (deserializer, (serializer(value),))


def unregister_reducer(cls: type) -> None:
    _custom_reducers.pop(cls, None)


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
        if _custom_reducers:
            stream = io.BytesIO()
            _CustomPickler(stream, protocol=5, buffer_callback=keep_out_of_band).dump(value)
            pickled = stream.getvalue()
        else:
            pickled = cloudpickle.dumps(value, protocol=5, buffer_callback=keep_out_of_band)
    except Exception as exc:
        raise SerializationError(
            f"could not serialize a value of type {type(value).__module__}."
            f"{type(value).__qualname__}: {type(exc).__name__}: {exc}"
        ) from exc
    return Serialized(pickled, buffers)


def _copy(target: memoryview, offset: int, source: memoryview, digest: Any) -> None:
    """Copies ``source`` into ``target`` at ``offset``, feeding ``digest`` (if any) each
    piece just written, while it is in the cache."""
    if digest is None:
        target[offset : offset + source.nbytes] = source
        return
    for start in range(0, source.nbytes, _CHUNK):
        piece = source[start : start + _CHUNK]
        written = target[offset + start : offset + start + piece.nbytes]
        written[:] = piece
        digest.update(written)


@dataclass(frozen=True, slots=True)
class _Parsed:
    checksum: int | None  # None: a blob without one
    entries: list[tuple[int, int]]
    pickle_start: int
    pickle_end: int


def _parse(view: memoryview) -> _Parsed:
    if view.nbytes < _HEADER.size:
        raise SerializationError(f"object blob truncated: {view.nbytes} bytes")
    magic, count, pickle_len = _HEADER.unpack_from(view, 0)
    if magic in (MAGIC, MAGIC_DEFERRED):
        if view.nbytes < _HEADER.size + _CHECKSUM.size:
            raise SerializationError(f"object blob truncated: {view.nbytes} bytes")
        (checksum,) = _CHECKSUM.unpack_from(view, _HEADER.size)
        if magic == MAGIC_DEFERRED:
            checksum = None  # not computed yet: nothing to check against
        pos = _HEADER.size + _CHECKSUM.size
    elif magic == MAGIC_UNCHECKED:
        checksum, pos = None, _HEADER.size
    else:
        raise SerializationError(f"not a serialized object (magic {bytes(magic)!r})")
    if pos + count * _ENTRY.size > view.nbytes:
        raise SerializationError("object blob truncated: its header points past its end")
    entries = []
    for _ in range(count):
        entries.append(_ENTRY.unpack_from(view, pos))
        pos += _ENTRY.size
    end = pos + pickle_len
    if end > view.nbytes or any(off + n > view.nbytes for off, n in entries):
        raise SerializationError("object blob truncated: its header points past its end")
    return _Parsed(checksum, entries, pos, end)


def _digest(view: memoryview, parsed: _Parsed, header: bytes) -> int:
    """The xxh3-64 of a blob: ``header`` (its first bytes, as they read once sealed),
    then everything after the checksum field but the padding."""
    digest = xxhash.xxh3_64(header)
    start = _HEADER.size + _CHECKSUM.size
    digest.update(view[start : parsed.pickle_end])
    for offset, length in parsed.entries:
        for piece in range(offset, offset + length, _CHUNK):
            digest.update(view[piece : min(piece + _CHUNK, offset + length)])
    return digest.intdigest()


def seal(blob: memoryview) -> bool:
    """Computes a deferred checksum (MAGIC_DEFERRED) into the blob's header, which then
    reads as any checked blob; True if it did. The checksum is written before the magic
    that says it is there, so a reader never sees a blob claiming a checksum it lacks."""
    view = memoryview(blob)
    try:
        if view.nbytes < _HEADER.size or bytes(view[:4]) != MAGIC_DEFERRED:
            return False
        parsed = _parse(view)
        header = MAGIC + bytes(view[4 : _HEADER.size])
        _CHECKSUM.pack_into(view, _HEADER.size, _digest(view, parsed, header))
        view[:4] = MAGIC
        return True
    finally:
        view.release()


def verify(blob: memoryview | bytes) -> bool:
    """Checks a blob's bytes against its checksum: ChecksumError if they differ, False
    for a blob without a checksum, True for one that matches. One pass over the blob
    (~30 GB/s here)."""
    view = memoryview(blob)
    size = view.nbytes
    try:  # released on the way out, so that a mapped blob's map can be closed
        parsed = _parse(view)
        if parsed.checksum is None:
            return False
        actual = _digest(view, parsed, bytes(view[: _HEADER.size]))
    finally:
        view.release()
    if actual != parsed.checksum:
        raise ChecksumError(
            f"xxh3-64 of its {size:,} bytes is {actual:016x}, written as {parsed.checksum:016x}"
        )
    return True


def deserialize(
    blob: memoryview | bytes,
    *,
    loads: Callable[..., Any] = pickle.loads,
    check: bool = True,
) -> Any:
    """Rebuilds a value from a blob; out-of-band buffers are views of ``blob``.

    ``check``: its bytes are verified against its checksum first (ChecksumError if
    they differ); a reader of a large object in this node's memory may skip that (it
    costs a pass over the object, which a zero-copy read otherwise never makes)."""
    view = memoryview(blob)
    if check:
        verify(view)
    parsed = _parse(view)
    buffers = [view[off : off + n] for off, n in parsed.entries]
    return loads(view[parsed.pickle_start : parsed.pickle_end], buffers=buffers)
