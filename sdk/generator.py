"""``ObjectRefGenerator``: what a call with ``num_returns="streaming"`` returns, as in
Ray. Iterating it (``next``, ``for``, ``async for``) gives the ref of each value the
generator yields, as soon as it is yielded (the node makes it visible once its
``created`` event is durable: controlplane/node/streams.py); after the last one,
StopIteration. A generator that raised gives a ref whose ``get`` raises its error,
then stops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from dataplane import context
from dataplane import protocol as p
from dataplane.client import DaemonError
from sdk.object_ref import ObjectRef
from sdk.runtime import client_or_auto_init, get_error


class ObjectRefGenerator:
    def __init__(self, task_id: str, backpressure: int = -1) -> None:
        self._task_id = task_id
        # > 0: the generator pauses while that many of its values are not taken here
        # (_generator_backpressure_num_objects), so each one taken is told
        self._backpressure = backpressure
        self._next = 0  # the index of the next value to hand out
        self._finished = False
        self._client = context.current_client()

    def task_id(self) -> str:
        return self._task_id

    def is_finished(self) -> bool:
        """Whether every value was handed out (StopIteration was raised)."""
        return self._finished

    def __iter__(self) -> ObjectRefGenerator:
        return self

    def __next__(self) -> ObjectRef:
        return self._take(None)

    def _next_sync(self, timeout_s: float | None = None) -> ObjectRef:
        """Ray's: the next ref, waiting at most ``timeout_s`` (GetTimeoutError after)."""
        return self._take(timeout_s)

    def __aiter__(self) -> ObjectRefGenerator:
        return self

    async def __anext__(self) -> ObjectRef:
        ref = await asyncio.to_thread(self._take_or_none)
        if ref is None:
            raise StopAsyncIteration
        return ref

    def _take_or_none(self) -> ObjectRef | None:
        """``_take``, None at the end (StopIteration cannot cross into a Future)."""
        try:
            return self._take(None)
        except StopIteration:
            return None

    def next_object_id(self) -> str:
        """The id of the value ``next`` waits for now (``wait`` looks at it)."""
        return p.return_object_id(self._task_id, self._next)

    def _take(self, timeout: float | None) -> ObjectRef:
        if self._finished:
            raise StopIteration
        client = client_or_auto_init()
        object_id = self.next_object_id()
        try:
            (location,) = client.get_locations([object_id], timeout)
        except DaemonError as error:  # a timeout, a daemon gone
            raise get_error(error, timeout) from None
        self._next += 1
        client.own_ref(object_id)  # the node holds it for this process: now a ref does
        if self._backpressure > 0:
            client.send(p.StreamConsumed(self._task_id, self._next))
        ref = ObjectRef._owned(object_id)
        if location.error is not None and location.error.kind == p.END_OF_STREAM:
            self._finished = True
            raise StopIteration
        return ref

    def __del__(self) -> None:
        client = self._client
        if client is not None and not self._finished and not client.closed:
            # (a finalizer: if the node is gone, so is what it held for us)
            with contextlib.suppress(Exception):
                client.send(p.ReleaseStream(self._task_id, self._next))

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._task_id})"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(
            "an ObjectRefGenerator cannot be passed to another task or actor: iterate it "
            "here and pass the refs it gives"
        )


class DynamicObjectRefGenerator:
    """The value of a ``num_returns="dynamic"`` task's one ref, as in Ray: iterating it
    gives the refs of the values the generator yielded, in order (then, if it raised,
    a ref whose ``get`` raises its error). It may be passed to tasks, like its ref;
    its values live as long as it (or its ref) does: they are the refs inside it."""

    def __init__(self, refs: list[ObjectRef]) -> None:
        self._refs = list(refs)

    def __iter__(self) -> Iterator[ObjectRef]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"DynamicObjectRefGenerator({len(self._refs)} refs)"

    def __reduce__(self) -> tuple[Any, ...]:
        return (DynamicObjectRefGenerator, (self._refs,))


def _dynamic_generator(object_ids: list[str]) -> DynamicObjectRefGenerator:
    """What a worker's value for a dynamic generator unpickles to (the data plane names
    this function, without importing the SDK: dataplane/worker.py)."""
    return DynamicObjectRefGenerator([ObjectRef(object_id) for object_id in object_ids])
