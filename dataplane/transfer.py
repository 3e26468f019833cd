"""Object transfer between nodes. The puller asks for an object's size
(``ObjectInfo``), then reads it in chunks of ``CHUNK_SIZE`` (``ReadObject``), at
most ``CHUNKS_IN_FLIGHT`` at a time, writing each into room taken in its own store as
it arrives: memory on both sides is bounded by the chunks in flight, whatever the
object's size (the puller asks, so neither side can run ahead of the other). Concurrent
pulls of one object share one transfer. The object stays put on its node meanwhile: it
is held there for the task that needs it (an argument) or until the puller releases it
(a result).

What arrives is checked against the object's checksum (in its blob's header, see
dataplane/serialization.py) before it is used: damaged bytes are a TransferError
(the object is then lost here and rebuilt), never a wrong value.

The calls travel over a ``NodeLink`` the caller gives (the cluster's gRPC service,
controlplane/node/rpc.py, with its token and TLS): this module knows the requests and
their answers, not how they cross the network.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from dataplane import protocol as p
from dataplane import shm
from dataplane.serialization import SerializationError, verify
from dataplane.store_memory import StoreMemory

CHUNK_SIZE = 1 << 20  # the bytes of one ReadObject call
CHUNKS_IN_FLIGHT = 4
WAIT_FOR_PENDING_S = 30.0  # how long a pull waits for an object not ready there yet
RELEASE_TIMEOUT_S = 5.0


class TransferError(ConnectionError):
    """The object could not be pulled (its node is gone, or no longer has it)."""


class LinkError(ConnectionError):
    """A call to another node failed; ``code`` names why (gRPC's status names)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code} {details}")
        self.code, self.details = code, details


class Refused(Exception):
    """A request a handler turns down; the link answers the caller with ``code``."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


Call = Callable[..., Awaitable[Any]]  # (request: dict, *, timeout=None) -> answer


class NodeLink(Protocol):
    """Calls to other nodes' services; failures are LinkError."""

    def unary(self, address: str, method: str) -> Call:
        """A call answered with a JSON object."""
        ...

    def raw(self, address: str, method: str) -> Call:
        """A call answered with bytes."""
        ...


InfoHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
ReadHandler = Callable[[dict[str, Any]], Awaitable[bytes]]


def object_service(
    memory: StoreMemory, job_of: Callable[[str], str | None] = lambda _object_id: None
) -> tuple[InfoHandler, ReadHandler]:
    """The ``ObjectInfo`` and ``ReadObject`` handlers over this node's store
    (``ReadObject`` raises Refused for a request it cannot answer). ``ObjectInfo`` names
    the object's job where ``job_of`` knows it: the puller's events of its copy name it
    too, without looking it up in the log."""
    objects = memory.objects

    def located(object_id: str) -> p.ObjectLocation | None:
        if not objects.is_ready(object_id):
            return None
        location = objects.location(object_id)
        return location if location.error is None else None

    async def info(request: dict[str, Any]) -> dict[str, Any]:
        object_id = str(request.get("object_id", ""))
        if objects.state(object_id) in ("pending", "spilled", "remote"):
            # on its way here (its events not yet durable: a puller reading the log can
            # be quicker than this node), or to be restored from disk or fetched
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def wake() -> None:
                if not ready.done():
                    ready.set_result(None)

            objects.on_ready(object_id, wake)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready, WAIT_FOR_PENDING_S)
        location = located(object_id)
        if location is None:
            return {"missing": True}
        if location.region is not None:  # a large blob's checksum, before it leaves
            await asyncio.to_thread(shm.seal_object, memory.prefix, location)
        answer = {"size": location.size, "contained": list(location.contained)}
        job_id = job_of(object_id)
        return answer if job_id is None else {**answer, "job_id": job_id}

    async def read(request: dict[str, Any]) -> bytes:
        object_id = str(request.get("object_id", ""))
        offset, length = int(request.get("offset", 0)), int(request.get("length", 0))
        location = located(object_id)
        if location is None:
            raise Refused("NOT_FOUND", f"no object {object_id} here")
        if not 0 <= offset <= location.size or not 0 < length <= CHUNK_SIZE:
            raise Refused("INVALID_ARGUMENT", "bad chunk range")
        if location.inline is not None:
            return location.inline[offset : offset + length]
        view = shm.object_view(memory.prefix, location)
        try:
            return bytes(view[offset : offset + length])
        finally:
            view.release()

    return info, read


class Puller:
    """Pulls objects from other nodes into this node's store."""

    def __init__(
        self,
        node_id: str,
        memory: StoreMemory,
        link: NodeLink,
        *,
        on_job: Callable[[str, str], None] = lambda _object_id, _job_id: None,
    ) -> None:
        """``on_job(object_id, job_id)`` hears the job of an object pulled, where its
        node named it, as the pull is done."""
        self.node_id = node_id
        self.memory = memory
        self._link = link
        self._on_job = on_job
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
        try:
            info = await self._link.unary(address, "ObjectInfo")({"object_id": object_id})
            if info.get("missing"):
                raise TransferError(f"node {address} no longer has object {object_id}")
            size, contained = int(info["size"]), tuple(info["contained"])
            read = self._link.raw(address, "ReadObject")
            if size <= shm.INLINE_LIMIT:
                data = await read({"object_id": object_id, "offset": 0, "length": size})
                _check_size(object_id, address, len(data), size)
                _check_bytes(object_id, address, data)
                pulled = p.ObjectLocation(object_id, inline=data, size=size, contained=contained)
            else:
                pulled = await self._into_store(object_id, address, size, contained, read)
        except LinkError as exc:
            raise TransferError(
                f"could not pull object {object_id} from {address}: {exc.code} {exc.details}"
            ) from None
        if isinstance(job_id := info.get("job_id"), str):
            self._on_job(object_id, job_id)
        return pulled

    async def release(self, address: str, object_id: str) -> None:
        """Tells the node at ``address`` that its copy of the object is no longer
        needed (a failure is ignored: that node frees it when its owner goes)."""
        with contextlib.suppress(LinkError):
            call = self._link.unary(address, "Release")
            await call({"object_id": object_id}, timeout=RELEASE_TIMEOUT_S)

    def discard(self, location: p.ObjectLocation) -> None:
        """A pulled copy nobody wants any more (freed or lost meanwhile): its room goes."""
        if location.region is None:
            self.memory.objects.uncharge(location.size)
        self.memory.give_back_location(location)

    async def _into_store(
        self, object_id: str, address: str, size: int, contained: tuple[str, ...], read: Any
    ) -> p.ObjectLocation:
        where = self.memory.take(size)
        if where is None:
            raise TransferError(
                f"no room for object {object_id} ({size:,} bytes) in this node's store"
            )
        location = p.ObjectLocation(
            object_id, region=where[0], offset=where[1], size=size, contained=contained
        )
        view = shm.object_view(self.memory.prefix, location, writable=True)
        slots = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

        async def chunk(offset: int) -> None:
            async with slots:
                length = min(CHUNK_SIZE, size - offset)
                data = await read({"object_id": object_id, "offset": offset, "length": length})
                _check_size(object_id, address, len(data), length)
                view[offset : offset + length] = data

        try:
            await asyncio.gather(*(chunk(o) for o in range(0, size, CHUNK_SIZE)))
            await asyncio.to_thread(_check_bytes, object_id, address, view)
        except BaseException:
            self.memory.give_back(*where, size)
            raise
        finally:
            view.release()
        return location


def _check_size(object_id: str, address: str, got: int, size: int) -> None:
    if got != size:
        raise TransferError(
            f"object {object_id} from {address} arrived truncated: {got:,} of {size:,} bytes"
        )


def _check_bytes(object_id: str, address: str, data: bytes | memoryview) -> None:
    """TransferError if the bytes pulled are not the object's (checksum mismatch)."""
    try:
        verify(data)
    except SerializationError as exc:
        raise TransferError(
            f"object {object_id}'s bytes do not match their checksum: pulled from {address}: {exc}"
        ) from None
