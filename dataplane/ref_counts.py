"""A process's references to objects, and its views of objects in the store, counted
where they change (every ObjectRef made or dropped, every value read from the store)
and told to the node daemon only as what they add up to: that the process starts or
stops holding an object, and views that began or ended. Changes are queued from any
thread (a finalizer's included) and folded by whoever sends next.

``RefCounts`` owns the queue and the counts; the client sends the frames it makes."""

from __future__ import annotations

import collections
from collections.abc import Callable

from dataplane import protocol as p

_OWN = 0  # a ref to an object this process created: held without telling the daemon
_VIEW, _UNVIEW = 2, 3  # a view of an object in the store begins / ends


class RefCounts:
    def __init__(self, released: Callable[[str], None]) -> None:
        """``released(object_id)``: this process no longer holds the object."""
        self._released = released
        self._changes: collections.deque[tuple[str, int]] = collections.deque()
        self._counts: dict[str, int] = {}

    def __bool__(self) -> bool:
        """Whether changes wait to be sent."""
        return bool(self._changes)

    def holds(self, object_id: str) -> bool:
        return self._counts.get(object_id, 0) > 0

    def own(self, object_id: str) -> None:
        self._changes.append((object_id, _OWN))

    def add(self, object_id: str) -> None:
        self._changes.append((object_id, 1))

    def remove(self, object_id: str) -> None:
        self._changes.append((object_id, -1))

    def view(self, object_id: str) -> None:
        self._changes.append((object_id, _VIEW))

    def unview(self, object_id: str) -> None:
        self._changes.append((object_id, _UNVIEW))

    def frames(self) -> tuple[bytes, bytes]:
        """What the queued changes add up to, as two frames (empty when none): the
        holds and views begun, to send before anything else, and the views ended and
        releases, to send after (a message may lend what they let go of)."""
        deltas, views = self._drain()
        holds = {oid: d for oid, d in deltas.items() if d > 0}
        releases = {oid: d for oid, d in deltas.items() if d < 0}
        begun = {oid: d for oid, d in views.items() if d > 0}
        ended = {oid: d for oid, d in views.items() if d < 0}
        return (
            (p.encode(p.RefCounts(holds)) if holds else b"")
            + (p.encode(p.ViewCounts(begun)) if begun else b""),
            (p.encode(p.ViewCounts(ended)) if ended else b"")
            + (p.encode(p.RefCounts(releases)) if releases else b""),
        )

    def _drain(self) -> tuple[dict[str, int], dict[str, int]]:
        """Folds queued changes into the counts; returns the holder changes to send
        (+1: this process now holds the object, -1: it no longer does) and the views
        begun and ended."""
        before: dict[str, int] = {}
        owned: set[str] = set()
        views: dict[str, int] = {}
        while self._changes:
            object_id, change = self._changes.popleft()
            if change in (_VIEW, _UNVIEW):
                views[object_id] = views.get(object_id, 0) + (1 if change == _VIEW else -1)
                continue
            count = self._counts.get(object_id, 0)
            before.setdefault(object_id, count)
            if change == _OWN:
                owned.add(object_id)
                change = 1
            self._counts[object_id] = count + change
        deltas = {}
        for object_id, was in before.items():
            now = self._counts[object_id]
            if now <= 0:
                del self._counts[object_id]
                self._released(object_id)
            if was <= 0 < now and object_id not in owned:
                deltas[object_id] = 1
            elif was > 0 >= now or (object_id in owned and now <= 0 and was <= 0):
                deltas[object_id] = -1
        return deltas, views
