"""The node's object table: for every object, where it is (once ready), who holds it,
and who waits for it; and the store's capacity accounting.

An object is freed when no process holds a ref to it (``holders``), no pending task
uses it as an argument and no live object contains it (``pins``) -- Ray's distributed
reference counting, with the daemon as the one place that counts.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dataplane import protocol as p


@dataclass(frozen=True)
class Elsewhere:
    """Where an object's bytes are when not in the store: ``remote`` (``where`` is the
    address of the node that made it) or ``spilled`` (``where`` is the file);
    ``location`` has its size and contained refs, no bytes."""

    kind: str
    where: str
    location: p.ObjectLocation


@dataclass
class _Entry:
    location: p.ObjectLocation | None = None  # set once ready (its events durable)
    pending: p.ObjectLocation | None = None  # known, waiting for its events
    holders: int = 0
    pins: int = 0
    ready_seq: int = 0
    # the refs its value contains, pinned by it from the moment its location is known
    # (before its events are durable: whoever made it may let them go meanwhile)
    pinned: tuple[str, ...] = ()
    callbacks: list[Callable[[], None]] = field(default_factory=list)
    # its bytes are not in the store but can be had when wanted: on another node (made
    # there) or in this node's spill directory
    elsewhere: Elsewhere | None = None
    # bytes in the store it had before it was lost or rebuilt, which a reader may still
    # be using: their ranges go back (``on_release``) only once the object is freed
    retired: list[p.ObjectLocation] = field(default_factory=list)


class ObjectTable:
    def __init__(
        self,
        capacity: int,
        on_free: Callable[[p.ObjectLocation], None],
        on_wanted: Callable[[str, Elsewhere], None] = lambda _object_id, _where: None,
        on_dropped: Callable[[str, Elsewhere], None] = lambda _object_id, _where: None,
        on_release: Callable[[p.ObjectLocation], None] = lambda _location: None,
    ) -> None:
        self.capacity = capacity
        self.used = 0
        self._on_free = on_free
        self._on_release = on_release  # a freed object's retired bytes may be reused
        self._on_wanted = on_wanted  # someone here waits for it: fetch or restore it
        self._on_dropped = on_dropped  # freed while elsewhere: that copy may go
        self._entries: dict[str, _Entry] = {}
        self._freed: set[str] = set()
        self._seq = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    # -- capacity ------------------------------------------------------------------

    def charge(self, size: int, *, force: bool = False) -> bool:
        if not force and self.used + size > self.capacity:
            return False
        self.used += size
        return True

    def uncharge(self, size: int) -> None:
        self.used = max(0, self.used - size)

    # -- references ----------------------------------------------------------------

    def _entry(self, object_id: str) -> _Entry:
        entry = self._entries.get(object_id)
        if entry is None:
            entry = self._entries[object_id] = _Entry()
        return entry

    def expect(self, object_id: str, location: p.ObjectLocation | None = None) -> None:
        """An object that will become ready; ``location`` if already known (its bytes
        exist, its events are on their way to the log)."""
        entry = self._entry(object_id)
        if location is not None:
            entry.pending = location
            self._unretire(entry, location)
            self._pin_contained(entry, location)

    def hold(self, object_id: str) -> None:
        if object_id not in self._freed:
            self._entry(object_id).holders += 1

    def release(self, object_id: str) -> None:
        entry = self._entries.get(object_id)
        if entry is not None:
            entry.holders -= 1
            self._maybe_free(object_id, entry)

    def pin(self, object_id: str) -> None:
        if object_id not in self._freed:
            self._entry(object_id).pins += 1

    def unpin(self, object_id: str) -> None:
        entry = self._entries.get(object_id)
        if entry is not None:
            entry.pins -= 1
            self._maybe_free(object_id, entry)

    def _maybe_free(self, object_id: str, entry: _Entry) -> None:
        """Frees an object nobody holds. One whose events are not durable yet may go
        too: nobody else can have seen it, and its ``freed`` event follows its
        ``created`` event through the same appender."""
        location = entry.location or entry.pending
        if entry.holders > 0 or entry.pins > 0 or self._entries.get(object_id) is not entry:
            return  # held, or freed already (by what its readiness set off)
        if location is None and entry.elsewhere is not None:  # not brought back
            del self._entries[object_id]
            self._freed.add(object_id)
            self._release_retired(entry)
            self._on_dropped(object_id, entry.elsewhere)
            self._unpin_contained(entry)
            return
        if location is None:
            return
        del self._entries[object_id]
        self._freed.add(object_id)
        self._release_retired(entry)
        if location.error is None:
            self.uncharge(location.size)
            self._on_free(location)
        self._unpin_contained(entry)

    def _release_retired(self, entry: _Entry) -> None:
        retired, entry.retired = entry.retired, []
        for location in retired:
            self._on_release(location)

    @staticmethod
    def _unretire(entry: _Entry, location: p.ObjectLocation) -> None:
        """The object's value is back where it was (the same range): not retired."""
        if entry.retired and location.region is not None:
            where = (location.region, location.offset)
            entry.retired = [old for old in entry.retired if (old.region, old.offset) != where]

    def _pin_contained(self, entry: _Entry, location: p.ObjectLocation) -> None:
        if not entry.pinned and location.contained:
            entry.pinned = location.contained
            for contained in entry.pinned:
                self.pin(contained)

    def _unpin_contained(self, entry: _Entry) -> None:
        pinned, entry.pinned = entry.pinned, ()
        for contained in pinned:
            self.unpin(contained)

    # -- readiness -----------------------------------------------------------------

    def ready(self, location: p.ObjectLocation) -> None:
        object_id = location.object_id
        if object_id in self._freed:
            return  # freed while its events were on their way
        entry = self._entry(object_id)
        if entry.pending is not None and entry.pending.error is not None:
            location = entry.pending  # lost while its events were on their way
        entry.location = location
        entry.elsewhere = None
        entry.ready_seq = next(self._seq)
        self._unretire(entry, location)
        self._pin_contained(entry, location)
        callbacks, entry.callbacks = entry.callbacks, []
        for callback in callbacks:
            callback()
        self._maybe_free(object_id, entry)

    def mark_lost(self, object_id: str, reason: str) -> bool:
        """The object's bytes are gone: from now on it stands for ObjectLostError
        (also if its events are still on their way). False if it was not a stored
        value (unknown, or an error already)."""
        entry = self._entries.get(object_id)
        stored = entry.location or entry.pending if entry is not None else None
        if entry is None or stored is None or stored.error is not None:
            return False
        self.uncharge(stored.size)
        if stored.region is not None:
            entry.retired.append(stored)
        lost = p.ObjectLocation(
            object_id, error=p.ErrorInfo("object_lost", f"object {object_id} was lost: {reason}")
        )
        if entry.location is not None:
            entry.location = lost
        entry.pending = lost  # ready() will publish the loss, not the bytes
        return True

    def state(self, object_id: str) -> str:
        """unknown, freed, pending (not ready yet), error, or stored (a value)."""
        entry = self._entries.get(object_id)
        if entry is None:
            return "freed" if object_id in self._freed else "unknown"
        if entry.location is None:
            return entry.elsewhere.kind if entry.elsewhere is not None else "pending"
        return "error" if entry.location.error is not None else "stored"

    def describe(self) -> list[dict[str, Any]]:
        """Every object the node knows: its state, size, holders and pins (``cairn
        memory``, ``memory_summary``)."""
        found = []
        for object_id, entry in self._entries.items():
            location = entry.location or entry.pending
            found.append(
                {
                    "object_id": object_id,
                    "state": self.state(object_id),
                    "size": location.size if location is not None else 0,
                    "in_store": location is not None and location.region is not None,
                    "holders": entry.holders,
                    "pins": entry.pins,
                }
            )
        return found

    def stored(self, object_id: str) -> p.ObjectLocation | None:
        """Where a ready object's value is; None if it is not ready, stands for an
        error, or is unknown here."""
        entry = self._entries.get(object_id)
        if entry is None or entry.location is None or entry.location.error is not None:
            return None
        return entry.location

    def unready(self, object_id: str) -> p.ObjectLocation | None:
        """Makes an object wait again (its value is being rebuilt), keeping who holds
        and waits for it; revives it if it was freed. The location it had, if any."""
        self._freed.discard(object_id)
        entry = self._entry(object_id)
        old = entry.location or entry.pending
        if old is not None and old.error is None:
            self.uncharge(old.size)
            if old.region is not None:
                entry.retired.append(old)
        entry.location, entry.pending = None, None
        entry.elsewhere = None
        self._unpin_contained(entry)  # the refs its old value contained
        return old

    def set_elsewhere(self, object_id: str, where: Elsewhere) -> None:
        """An object whose bytes are not in the store (left on the node that made it,
        or spilled to disk) until someone here waits for it: then ``on_wanted``
        fetches it, and ``ready`` makes it local again."""
        if object_id in self._freed:
            self._on_dropped(object_id, where)
            return
        entry = self._entry(object_id)
        if entry.location is not None and entry.location.error is None:
            self.uncharge(entry.location.size)  # its bytes leave the store
        entry.location = entry.pending = None
        entry.elsewhere = where
        if entry.callbacks:
            self._on_wanted(object_id, where)

    def remote_at(self, address: str) -> list[str]:
        """The objects held here whose only copy is on the node at ``address``."""
        return [
            oid
            for oid, entry in self._entries.items()
            if entry.elsewhere is not None
            and entry.elsewhere.kind == "remote"
            and entry.elsewhere.where == address
        ]

    def spill_candidates(
        self, needed: int, busy: set[str], *, partial: bool = False
    ) -> list[p.ObjectLocation]:
        """Objects to spill to disk to free ``needed`` bytes: values in the store that
        no pending task uses (not pinned), oldest first; empty if they cannot free
        enough, unless ``partial`` (then as many as there are, up to ``needed``)."""
        chosen, freed = [], 0
        ready = sorted(
            (
                (entry.ready_seq, oid, entry.location)
                for oid, entry in self._entries.items()
                if entry.location is not None and _spillable(oid, entry, entry.location, busy)
            ),
            key=lambda item: item[0],
        )
        for _seq, _oid, location in ready:
            if freed >= needed:
                break
            chosen.append(location)
            freed += location.size
        return chosen if freed >= needed or partial else []

    def becoming_spillable(self, busy: set[str]) -> bool:
        """Whether a value in the store that no pending task uses waits for its events
        to be durable: ready soon, and a spill candidate then."""
        return any(
            entry.location is None
            and entry.pending is not None
            and _spillable(oid, entry, entry.pending, busy)
            for oid, entry in self._entries.items()
        )

    def is_wanted(self, object_id: str) -> bool:
        """Whether something here waits for the object."""
        entry = self._entries.get(object_id)
        return entry is not None and bool(entry.callbacks)

    def is_ready(self, object_id: str) -> bool:
        entry = self._entries.get(object_id)
        return object_id in self._freed or (entry is not None and entry.location is not None)

    def location(self, object_id: str) -> p.ObjectLocation:
        entry = self._entries.get(object_id)
        if entry is None or entry.location is None:
            return p.ObjectLocation(
                object_id,
                error=p.ErrorInfo(
                    "object_lost", f"object {object_id} was freed or never existed on this node"
                ),
            )
        return entry.location

    def on_ready(self, object_id: str, callback: Callable[[], None]) -> None:
        if self.is_ready(object_id):
            callback()
        else:
            self._wait_for(object_id, callback)

    def _wait_for(self, object_id: str, callback: Callable[[], None]) -> None:
        entry = self._entry(object_id)
        entry.callbacks.append(callback)
        if entry.elsewhere is not None and entry.location is None:
            self._on_wanted(object_id, entry.elsewhere)

    def when_ready(
        self,
        object_ids: list[str],
        count: int,
        timeout: float | None,
        finish: Callable[[bool], None],
    ) -> None:
        """Calls ``finish(timed_out)`` once ``count`` of the objects are ready, or when
        ``timeout`` seconds have passed (None: no limit)."""
        pending = [oid for oid in dict.fromkeys(object_ids) if not self.is_ready(oid)]
        have = len(set(object_ids)) - len(pending)
        if have >= count:
            finish(False)
            return
        state = {"have": have, "done": False}
        timer: asyncio.TimerHandle | None = None

        def one_ready() -> None:
            state["have"] += 1
            if not state["done"] and state["have"] >= count:
                state["done"] = True
                if timer is not None:
                    timer.cancel()
                finish(False)

        def timed_out() -> None:
            if not state["done"]:
                state["done"] = True
                finish(True)

        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(max(0.0, timeout), timed_out)
        for oid in pending:
            self._wait_for(oid, one_ready)

    def ready_in_order(self, object_ids: list[str], limit: int) -> list[str]:
        """The ready ones among ``object_ids``, in the order they became ready."""
        ready = [oid for oid in object_ids if self.is_ready(oid)]
        ready.sort(key=lambda oid: self._entries[oid].ready_seq if oid in self._entries else 0)
        return ready[:limit]


def _spillable(oid: str, entry: _Entry, location: p.ObjectLocation, busy: set[str]) -> bool:
    """Whether an object at ``location`` may be spilled: a value in the store that no
    pending task uses (not pinned) and no spill has taken already."""
    return (
        location.region is not None
        and location.error is None
        and entry.pins == 0
        and oid not in busy
    )
