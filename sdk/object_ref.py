"""ObjectRef: a future for an object in the cluster (``ray.ObjectRef``).

Hashable, picklable (a ref inside an argument or a stored value stays a ref), awaitable
and convertible to a ``concurrent.futures.Future``. Every live ObjectRef instance counts
as a reference for distributed reference counting: the object is freed when none
remains anywhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Generator
from typing import Any

from dataplane import context
from dataplane.serialization import note_contained_ref
from sdk.ids import TaskID
from sdk.runtime import get_values


class ObjectRef:
    __slots__ = ("__weakref__", "_client", "_id")

    def __init__(self, object_id: str, *, _owned: bool = False) -> None:
        self._id = object_id
        client = context.current_client()
        self._client = client
        if client is not None and not _owned:
            client.add_ref(object_id)

    @classmethod
    def _owned(cls, object_id: str) -> ObjectRef:
        """A ref to an object this process just created (already counted)."""
        return cls(object_id, _owned=True)

    def hex(self) -> str:
        return self._id

    def binary(self) -> bytes:
        return bytes.fromhex(self._id)

    def task_id(self) -> TaskID:
        """The task that makes it, as Ray's ID object (``.hex()`` is its id)."""
        return TaskID(self._id[:-8])

    def __hash__(self) -> int:
        return hash(self._id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __repr__(self) -> str:
        return f"ObjectRef({self._id})"

    def __reduce__(self) -> tuple[Any, ...]:
        note_contained_ref(self._id)
        return (ObjectRef, (self._id,))

    def __del__(self) -> None:
        client = self._client
        if client is not None:
            client.remove_ref(self._id)

    def future(self) -> concurrent.futures.Future[Any]:
        """A Future that resolves to the object's value (or its error)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def resolve() -> None:
            try:
                future.set_result(get_values([self._id], None)[0])
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=resolve, name=f"cairn-future-{self._id[:8]}", daemon=True).start()
        return future

    def as_future(self, _internal: bool = False) -> asyncio.Future[Any]:
        """An asyncio Future of the running loop that resolves to the value (Ray's)."""
        return asyncio.wrap_future(self.future())

    def _on_completed(self, py_callback: Callable[[Any], None]) -> None:
        """Calls ``py_callback`` with the value once it is ready (with the exception
        instead, if the task failed), from another thread, as Ray's."""

        def done(future: concurrent.futures.Future[Any]) -> None:
            error = future.exception()
            py_callback(error if error is not None else future.result())

        self.future().add_done_callback(done)

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self.future()).__await__()
