"""Corrupt data (issue 8): objects and wire messages carry checksums, so flipped bytes
in a stored object (shared memory, a spilled or durable copy) or in a message are
detected -- the object is rebuilt or reported lost, the connection is closed -- and
never come back as a wrong value; the node daemon stays up through all of it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from log_rows import rows, wait_for_rows
from store_objects import flip

import sdk as ray
from dataplane import context
from dataplane import protocol as p
from dataplane.serialization import (
    ChecksumError,
    SerializationError,
    _parse,
    deserialize,
    seal,
    serialize,
    verify,
)
from sdk.exceptions import ObjectLostError

MB = 1024 * 1024
MISMATCH = "do not match their checksum"
_EVENTS_OF = "SELECT 1 FROM events WHERE entity_id = $1"


# -- the formats, without a cluster ---------------------------------------------------


_VALUE = {"array": np.arange(40_000, dtype=np.int64), "text": "x" * 6000, "n": 7}
_BLOB = serialize(_VALUE, inband_limit=1024).to_bytes()


_PARSED = _parse(memoryview(_BLOB))
# the alignment padding before each out-of-band buffer: no part of the value
_PADDING = {
    i
    for start, (offset, _) in zip(
        [_PARSED.pickle_end, *(o + n for o, n in _PARSED.entries)], _PARSED.entries, strict=False
    )
    for i in range(start, offset)
}


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, len(_BLOB) - 1), flip=st.integers(1, 255))
def test_a_flipped_byte_in_an_object_blob_never_gives_a_wrong_value(index: int, flip: int) -> None:
    damaged = bytearray(_BLOB)
    damaged[index] ^= flip
    if index in _PADDING:  # not checksummed, as it is not read: the same value
        value = deserialize(bytes(damaged))
        assert value["text"] == _VALUE["text"] and np.array_equal(value["array"], _VALUE["array"])
        return
    with pytest.raises(SerializationError):
        deserialize(bytes(damaged))


def test_the_blob_under_test_has_padding() -> None:
    assert _PADDING and max(_PADDING) < len(_BLOB)


def test_blobs_without_checksums_are_still_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAIRN_OBJECT_CHECKSUMS", "0")
    blob = serialize(_VALUE).to_bytes()
    assert blob[:4] == b"CRN1" and verify(blob) is False
    assert deserialize(blob)["text"] == _VALUE["text"]
    assert verify(_BLOB) is True


def test_a_large_blob_is_sealed_before_it_leaves_and_then_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A blob above the local-read check size is written without hashing (a put runs at
    the copy's speed); sealing computes the same checksum a hashed write would have."""
    monkeypatch.setenv("CAIRN_VERIFY_READ_MAX_BYTES", "1000")
    deferred = bytearray(serialize(_VALUE, inband_limit=1024).to_bytes())
    assert deferred[:4] == b"crn3" and verify(bytes(deferred)) is False
    assert deserialize(bytes(deferred))["text"] == _VALUE["text"]
    assert seal(memoryview(deferred)) is True
    assert bytes(deferred) == _BLOB  # as if hashed while written
    assert seal(memoryview(deferred)) is False  # once
    deferred[len(deferred) // 2] ^= 1
    with pytest.raises(ChecksumError):
        verify(bytes(deferred))


def test_a_values_checksum_is_the_same_however_its_blob_was_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What output digests are made of: hashed while written, or computed from the
    value when the write deferred it or wrote no checksum, it is the sealed blob's."""
    sealed = int.from_bytes(_BLOB[16:24], "little")  # after magic, count, pickle length
    written = serialize(_VALUE, inband_limit=1024)
    written.to_bytes()
    assert written.written_checksum == sealed == written.value_checksum()
    monkeypatch.setenv("CAIRN_VERIFY_READ_MAX_BYTES", "1000")  # deferred
    deferred = serialize(_VALUE, inband_limit=1024)
    deferred.to_bytes()
    assert deferred.written_checksum is None and deferred.value_checksum() == sealed
    monkeypatch.setenv("CAIRN_OBJECT_CHECKSUMS", "0")  # none written
    unchecked = serialize(_VALUE, inband_limit=1024)
    assert unchecked.to_bytes()[:4] == b"CRN1" and unchecked.value_checksum() == sealed
    other = serialize({**_VALUE, "n": 8}, inband_limit=1024)
    assert other.value_checksum() != sealed


_FRAME = p.encode(p.GetObjects(7, ["a" * 40, "b" * 40], 1.5))


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, len(_FRAME) - 1), flip=st.integers(1, 255))
def test_a_flipped_byte_in_a_message_is_a_protocol_error(index: int, flip: int) -> None:
    damaged = bytearray(_FRAME)
    damaged[index] ^= flip
    with pytest.raises(p.ProtocolError):
        p.decode_frame(bytes(damaged))


def test_frames_stored_before_checksums_are_still_read() -> None:
    import pickle
    import struct

    body = pickle.dumps(p.Notice("old"), protocol=5)
    assert p.decode_frame(struct.pack("<I", len(body)) + body) == p.Notice("old")
    with pytest.raises(ChecksumError):
        verify(_BLOB[:20] + b"\x00" + _BLOB[21:])


# -- a node -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[None]:
    ray.init(num_cpus=2, object_store_memory=100 * MB)
    try:
        yield
    finally:
        ray.shutdown()


@ray.remote
def filled(n: int, size: int) -> np.ndarray:
    return np.full(size // 8, n, dtype=np.int64)


@ray.remote
def one() -> int:
    return 1


def _flip(path: Path, offset: int) -> None:
    """Flips one byte of a file behind the node's back (as bad memory or disk would)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def _history(object_id: str) -> list[str]:
    """The object's events, as "type payload", in log order."""
    return [
        f"{r['event_type']} {r['payload']}"
        for r in rows(
            ray.get_runtime_context().gcs_address,
            "SELECT event_type, payload::text AS payload FROM events "
            "WHERE entity_id = $1 ORDER BY position",
            object_id,
        )
    ]


def _lost_reasons(object_id: str) -> list[str]:
    return [
        r["reason"]
        for r in rows(
            ray.get_runtime_context().gcs_address,
            "SELECT payload->>'reason' AS reason FROM events "
            "WHERE entity_id = $1 AND event_type = 'lost' ORDER BY position",
            object_id,
        )
    ]


@pytest.mark.timeout(120)
def test_a_damaged_task_result_is_rebuilt_not_returned(node: None) -> None:
    ref = filled.remote(3, MB)
    assert int(ray.get(ref, timeout=60)[-1]) == 3
    flip(ref, MB // 2)  # in the middle of the array's bytes
    value = ray.get(ref, timeout=60)
    assert value.shape == (MB // 8,) and bool((value == 3).all())
    assert any(MISMATCH in reason for reason in _lost_reasons(ref.hex()))


@pytest.mark.timeout(120)
def test_a_damaged_put_without_a_copy_is_lost_with_a_clear_error(node: None) -> None:
    ref = ray.put(np.full(MB // 8, 5, dtype=np.int64))
    flip(ref, 200)
    with pytest.raises(ObjectLostError, match=MISMATCH):
        ray.get(ref, timeout=60)


@pytest.mark.timeout(120)
def test_a_damaged_durable_put_comes_back_from_its_copy_unless_that_is_damaged_too(
    node: None,
) -> None:
    ref = ray.put(np.full(MB // 8, 9, dtype=np.int64), durable=True)
    # its copy is made before its created event
    wait_for_rows(ray.get_runtime_context().gcs_address, _EVENTS_OF, ref.hex())
    flip(ref, MB // 3)
    assert bool((ray.get(ref, timeout=60) == 9).all())  # recovered from its copy

    (row,) = rows(
        ray.get_runtime_context().gcs_address,
        "SELECT payload->>'durable_path' AS path FROM events "
        "WHERE entity_id = $1 AND event_type = 'created'",
        ref.hex(),
    )
    _flip(Path(row["path"]), MB // 3)
    flip(ref, MB // 3)
    with pytest.raises(ObjectLostError, match=MISMATCH):
        ray.get(ref, timeout=60)


@pytest.mark.timeout(120)
def test_a_damaged_spilled_copy_is_rebuilt_not_restored(node: None) -> None:
    first = filled.remote(1, 30 * MB)
    ray.wait([first], timeout=60)
    others = [filled.remote(n, 30 * MB) for n in range(2, 6)]  # spills the first
    ray.wait(others, num_returns=len(others), timeout=60)
    spilled = rows(
        ray.get_runtime_context().gcs_address,
        "SELECT payload->>'path' AS path FROM events "
        "WHERE entity_id = $1 AND event_type = 'spilled' ORDER BY position DESC LIMIT 1",
        first.hex(),
    )
    assert spilled, "the first result was not spilled"
    path = Path(spilled[0]["path"])
    assert path.exists(), f"its spilled copy is gone; its events: {_history(first.hex())}"
    _flip(path, 20 * MB)
    value = ray.get(first, timeout=60)
    assert value.shape == (30 * MB // 8,) and bool((value == 1).all())
    assert any(MISMATCH in reason for reason in _lost_reasons(first.hex()))
    del value, others


def _frames(sock: socket.socket, timeout: float = 10.0) -> list[object]:
    """The messages the daemon sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    out, pos = [], 0
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "little")
        out.append(p.decode_frame(data[pos : pos + 12 + length]))
        pos += 12 + length
    return out


@pytest.mark.timeout(120)
def test_damaged_and_truncated_messages_close_only_their_connection(node: None) -> None:
    client = context.current_client()
    assert client is not None
    path = str(Path(client.welcome.session_dir) / "node.sock")
    hello = p.encode(p.Hello("observer", 1))

    damaged = bytearray(p.encode(p.ClusterInfoRequest(1)))
    damaged[-3] ^= 0xFF
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(hello + bytes(damaged))
        messages = _frames(sock)
    assert all(isinstance(m, p.Welcome) for m in messages[:-1])  # no cluster info
    assert isinstance(messages[-1], p.Shutdown) and MISMATCH in messages[-1].reason

    for tail in (hello[:7], hello + p.encode(p.ClusterInfoRequest(2))[:-5], b"\xff" * 12):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.sendall(tail)
            sock.shutdown(socket.SHUT_WR)  # truncated: nothing more comes
            _frames(sock)  # the daemon closes it

    assert ray.get(one.remote(), timeout=30) == 1  # the daemon and its workers carry on
    assert ray.get(filled.remote(4, MB), timeout=30)[0] == 4
