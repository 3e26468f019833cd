"""ActorPool: spreads work over a fixed set of actors (``ray.util.ActorPool``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sdk.object_ref import ObjectRef

Submit = Callable[[Any, Any], ObjectRef]


class ActorPool:
    """``fn(actor, value)`` submits one piece of work to an idle actor and returns its
    ref; work waits while every actor is busy. Results come back in submission order
    (``get_next``, ``map``) or as they complete (``get_next_unordered``,
    ``map_unordered``)."""

    def __init__(self, actors: Iterable[Any]) -> None:
        self._idle: list[Any] = list(actors)
        self._busy: dict[ObjectRef, tuple[int, Any]] = {}  # ref -> (index, actor)
        self._by_index: dict[int, ObjectRef] = {}
        self._next_index = 0
        self._next_return = 0
        # work waiting for an idle actor (Ray's name: its tests read it)
        self._pending_submits: list[tuple[Submit, Any]] = []

    def map(self, fn: Submit, values: Iterable[Any]) -> Iterator[Any]:
        """Submits every value now (as Ray's), and gives their results in order."""
        self._submit_all(fn, values)
        return self._results(self.get_next)

    def map_unordered(self, fn: Submit, values: Iterable[Any]) -> Iterator[Any]:
        """Submits every value now, and gives their results as they complete."""
        self._submit_all(fn, values)
        return self._results(self.get_next_unordered)

    def _submit_all(self, fn: Submit, values: Iterable[Any]) -> None:
        while self.has_next():  # results of earlier submissions are dropped, as in Ray
            self.get_next_unordered()
        for value in values:
            self.submit(fn, value)

    def _results(self, take: Callable[[], Any]) -> Iterator[Any]:
        while self.has_next():
            yield take()

    def submit(self, fn: Submit, value: Any) -> None:
        if not self._idle:
            self._pending_submits.append((fn, value))
            return
        actor = self._idle.pop()
        ref = fn(actor, value)
        self._busy[ref] = (self._next_index, actor)
        self._by_index[self._next_index] = ref
        self._next_index += 1

    def has_next(self) -> bool:
        return bool(self._busy)

    def get_next(self, timeout: float | None = None, ignore_if_timedout: bool = False) -> Any:
        """The next result in submission order."""
        from sdk import api

        if not self.has_next():
            raise StopIteration("No more results to get")
        if self._next_return not in self._by_index:
            raise ValueError("It is not allowed to call get_next() after get_next_unordered().")
        ref = self._by_index[self._next_return]
        if timeout is not None and not api.wait([ref], timeout=timeout)[0]:
            if ignore_if_timedout:
                return None
            raise TimeoutError("Timed out waiting for result")
        del self._by_index[self._next_return]
        self._next_return += 1
        self._release(ref)
        return api.get(ref)

    def get_next_unordered(
        self, timeout: float | None = None, ignore_if_timedout: bool = False
    ) -> Any:
        """Whichever pending result is ready first."""
        from sdk import api

        if not self.has_next():
            raise StopIteration("No more results to get")
        ready, _ = api.wait(list(self._busy), num_returns=1, timeout=timeout)
        if not ready:
            if ignore_if_timedout:
                return None
            raise TimeoutError("Timed out waiting for result")
        ref = ready[0]
        index = self._release(ref)
        del self._by_index[index]
        self._next_return = max(self._next_return, index + 1)
        return api.get(ref)

    def has_free(self) -> bool:
        return bool(self._idle) and not self._pending_submits

    def pop_idle(self) -> Any | None:
        return self._idle.pop() if self.has_free() else None

    def push(self, actor: Any) -> None:
        if actor in self._idle or any(a == actor for _, a in self._busy.values()):
            raise ValueError("Actor already belongs to current ActorPool")
        self._make_idle(actor)

    def _release(self, ref: ObjectRef) -> int:
        index, actor = self._busy.pop(ref)
        self._make_idle(actor)
        return index

    def _make_idle(self, actor: Any) -> None:
        self._idle.append(actor)
        if self._pending_submits:
            self.submit(*self._pending_submits.pop(0))
