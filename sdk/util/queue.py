"""A first-in, first-out queue shared by tasks and actors (``ray.util.queue``), kept in
an async actor, so blocking ``put``/``get`` wait there without holding a worker."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterable
from typing import Any


class Empty(queue.Empty):
    """``get`` found nothing (without blocking, or within its timeout)."""


class Full(queue.Full):
    """``put`` found no room (without blocking, or within its timeout)."""


class _QueueActor:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.items: asyncio.Queue[Any] = asyncio.Queue(maxsize)

    def qsize(self) -> int:
        return self.items.qsize()

    def empty(self) -> bool:
        return self.items.empty()

    def full(self) -> bool:
        return self.items.full()

    async def put(self, item: Any, timeout: float | None) -> bool:
        try:
            await asyncio.wait_for(self.items.put(item), timeout)
        except TimeoutError:
            return False
        return True

    async def get(self, timeout: float | None) -> tuple[bool, Any]:
        try:
            return True, await asyncio.wait_for(self.items.get(), timeout)
        except TimeoutError:
            return False, None

    async def put_nowait_batch(self, items: list[Any]) -> bool:
        if self.maxsize > 0 and len(items) + self.items.qsize() > self.maxsize:
            return False
        for item in items:
            self.items.put_nowait(item)
        return True

    async def get_nowait_batch(self, count: int) -> tuple[bool, list[Any]]:
        if count > self.items.qsize():
            return False, []
        return True, [self.items.get_nowait() for _ in range(count)]


class Queue:
    def __init__(self, maxsize: int = 0, actor_options: dict[str, Any] | None = None) -> None:
        from sdk import api

        self.maxsize = maxsize
        actor_class = api.remote(_QueueActor)
        options = {"max_concurrency": 1000, **(actor_options or {})}
        self.actor = actor_class.options(**options).remote(maxsize)

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        return self.qsize()

    def qsize(self) -> int:
        from sdk import api

        return api.get(self.actor.qsize.remote())

    def empty(self) -> bool:
        from sdk import api

        return bool(api.get(self.actor.empty.remote()))

    def full(self) -> bool:
        from sdk import api

        return bool(api.get(self.actor.full.remote()))

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Adds ``item``; waits for room (up to ``timeout``) unless ``block`` is False."""
        from sdk import api

        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        if not block:
            if not api.get(self.actor.put_nowait_batch.remote([item])):
                raise Full
            return
        if not api.get(self.actor.put.remote(item, timeout)):
            raise Full

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Removes and returns the first item; waits (up to ``timeout``) unless
        ``block`` is False."""
        from sdk import api

        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        if not block:
            ok, items = api.get(self.actor.get_nowait_batch.remote(1))
            if not ok:
                raise Empty
            return items[0]
        ok, item = api.get(self.actor.get.remote(timeout))
        if not ok:
            raise Empty
        return item

    async def put_async(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """``put`` for async code: awaits room without blocking the event loop."""
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        if not block:
            if not await self.actor.put_nowait_batch.remote([item]):
                raise Full
            return
        if not await self.actor.put.remote(item, timeout):
            raise Full

    async def get_async(self, block: bool = True, timeout: float | None = None) -> Any:
        """``get`` for async code: awaits an item without blocking the event loop."""
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        if not block:
            ok, items = await self.actor.get_nowait_batch.remote(1)
            if not ok:
                raise Empty
            return items[0]
        ok, item = await self.actor.get.remote(timeout)
        if not ok:
            raise Empty
        return item

    def put_nowait(self, item: Any) -> None:
        self.put(item, block=False)

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def put_nowait_batch(self, items: Iterable[Any]) -> None:
        from sdk import api

        batch = list(items)
        if not api.get(self.actor.put_nowait_batch.remote(batch)):
            raise Full(
                f"Cannot add {len(batch)} items to queue of size {self.qsize()} "
                f"and maxsize {self.maxsize}."
            )

    def get_nowait_batch(self, num_items: int) -> list[Any]:
        from sdk import api

        if not isinstance(num_items, int) or num_items < 0:
            raise ValueError("'num_items' must be a non-negative integer")
        ok, items = api.get(self.actor.get_nowait_batch.remote(num_items))
        if not ok:
            raise Empty(f"Cannot get {num_items} items from queue of size {self.qsize()}.")
        return items

    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        from sdk import api

        if self.actor is not None:
            api.kill(self.actor)
        self.actor = None
