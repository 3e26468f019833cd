"""Object transfer between nodes over gRPC: ``PullObject`` streams an object's bytes in
chunks of ``rpc.CHUNK_SIZE``; the puller writes each chunk into a new segment of its own
store as it arrives, so neither side holds more than a chunk or two in memory whatever
the object's size. Concurrent pulls of one object share one transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc

from controlplane.node import rpc
from controlplane.node.objects import ObjectTable
from dataplane import protocol as p
from dataplane import shm


class TransferError(ConnectionError):
    """The object could not be pulled (its node is gone, or no longer has it)."""


def serve_object(objects: ObjectTable) -> rpc.StreamHandler:
    """The ``PullObject`` handler over this node's object table."""

    async def pull(
        request: dict[str, Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        object_id = str(request.get("object_id", ""))
        if not objects.is_ready(object_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no object {object_id} here")
        location = objects.location(object_id)
        if location.error is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, location.error.message)
        objects.pin(object_id)  # not freed while it streams
        try:
            header = {"size": location.size, "contained": list(location.contained)}
            yield json.dumps(header).encode()
            if location.inline is not None:
                yield location.inline
                return
            assert location.shm_name is not None
            mapping = shm.map_segment(location.shm_name, location.size)
            try:
                for offset in range(0, location.size, rpc.CHUNK_SIZE):
                    yield mapping[offset : offset + rpc.CHUNK_SIZE]
            finally:
                mapping.close()
        finally:
            objects.unpin(object_id)

    return pull


class Puller:
    """Pulls objects from other nodes into this node's store."""

    def __init__(self, node_id: str, objects: ObjectTable) -> None:
        self.node_id = node_id
        self.objects = objects
        self._pulls: dict[str, asyncio.Future[p.ObjectLocation]] = {}

    def pull(self, address: str, object_id: str) -> asyncio.Future[p.ObjectLocation]:
        """The object's location in this node's store, once pulled from ``address``."""
        pending = self._pulls.get(object_id)
        if pending is None:
            pending = asyncio.ensure_future(self._pull(address, object_id))
            self._pulls[object_id] = pending
            pending.add_done_callback(lambda _f: self._pulls.pop(object_id, None))
        return pending

    async def _pull(self, address: str, object_id: str) -> p.ObjectLocation:
        async with grpc.aio.insecure_channel(address, options=rpc.CHANNEL_OPTIONS) as channel:
            stream = rpc.stream_stub(channel, "PullObject")({"object_id": object_id})
            try:
                header = json.loads(await stream.read())
                size, contained = int(header["size"]), tuple(header["contained"])
                if size <= shm.INLINE_LIMIT:
                    data = b"".join([chunk async for chunk in _chunks(stream)])
                    _check_size(object_id, address, len(data), size)
                    return p.ObjectLocation(object_id, inline=data, size=size, contained=contained)
                return await self._into_segment(object_id, address, size, contained, stream)
            except grpc.aio.AioRpcError as exc:
                raise TransferError(
                    f"could not pull object {object_id} from {address}: "
                    f"{exc.code().name} {exc.details()}"
                ) from None

    async def _into_segment(
        self,
        object_id: str,
        address: str,
        size: int,
        contained: tuple[str, ...],
        stream: Any,
    ) -> p.ObjectLocation:
        if not self.objects.charge(size):
            raise TransferError(
                f"no room for object {object_id} ({size:,} bytes) in this node's store"
            )
        name = shm.segment_name(self.node_id, object_id)
        fd = os.open(shm.SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        received = 0
        try:
            os.ftruncate(fd, size)
            async for chunk in _chunks(stream):
                os.pwrite(fd, chunk, received)
                received += len(chunk)
            _check_size(object_id, address, received, size)
        except BaseException:
            self.objects.uncharge(size)
            shm.unlink_segment(name)
            raise
        finally:
            os.close(fd)
        return p.ObjectLocation(object_id, shm_name=name, size=size, contained=contained)


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    """The rest of a stream whose first message was taken with ``read()`` (gRPC does
    not allow iterating a stream after reading from it)."""
    while (chunk := await stream.read()) is not grpc.aio.EOF:
        yield chunk


def _check_size(object_id: str, address: str, got: int, size: int) -> None:
    if got != size:
        raise TransferError(
            f"object {object_id} from {address} arrived truncated: {got:,} of {size:,} bytes"
        )


async def release(address: str, object_id: str) -> None:
    """Tells the node at ``address`` that its copy of the object is no longer needed."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        async with grpc.aio.insecure_channel(address) as channel:
            await rpc.unary_stub(channel, "Release")({"object_id": object_id}, timeout=5)
