"""The node's objects as the log sees them: puts (small ones into the log, durable ones
copied to disk first), room reserved for new segments (spilling others when full), and
the rule that an object becomes ready -- visible to ``get``, ``wait`` and its owner --
only once its ``created`` event is durable. It owns the object table, the pool of
recycled segments and the spiller (dataplane/), and logs what they report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane.eventlog import EntityKind, Event
from controlplane.node.recorder import EventRecorder
from dataplane import protocol as p
from dataplane import shm
from dataplane.object_table import Elsewhere, ObjectTable
from dataplane.segment_pool import SegmentPool
from dataplane.spilling import Spiller

if TYPE_CHECKING:
    from controlplane.node.task_table import Connection

log = logging.getLogger("cairn.node")
K = EntityKind
_POOL_LIMIT = 2 * 1024**3


class ObjectStore:
    def __init__(
        self,
        node_id: str,
        capacity: int,
        spill_dir: Path,
        durable_dir: Path,
        recorder: EventRecorder,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        schedule: Callable[[], None],
        fetch_remote: Callable[[str, str], None],
        release_remote: Callable[[str, str], object],
        on_lost: Callable[[str, str], None],
    ) -> None:
        """``fetch_remote(object_id, address)``: bring an object left on another node;
        ``release_remote(address, object_id)``: that node may free its copy;
        ``on_lost(object_id, why)``: a spilled copy could not be read back;
        ``schedule()``: objects became ready (tasks may wait for them)."""
        self.node_id = node_id
        self.recorder = recorder
        self.durable_dir = durable_dir
        self._spawn = spawn
        self._schedule = schedule
        self._fetch_remote = fetch_remote
        self._release_remote = release_remote
        self.objects = ObjectTable(
            capacity,
            on_free=self._freed,
            on_wanted=self._bring_back,
            on_dropped=self._drop_elsewhere,
        )
        self.pool = SegmentPool(node_id, limit=min(capacity // 4, _POOL_LIMIT))
        self.spiller = Spiller(
            node_id,
            spill_dir,
            self.objects,
            self.pool,
            spawn=spawn,
            record=self.object_event,
            on_lost=on_lost,
            on_restored=schedule,
        )

    def put(
        self, location: p.ObjectLocation, task_id: str | None, job_id: str | None, durable: bool
    ) -> None:
        """A put object: a small value goes into the log with its ``created`` event; a
        large one asked to be durable is copied to the durable directory first (the
        event names the copy). Either can be recovered if its bytes are lost."""
        if location.shm_name is None:
            self.objects.charge(location.size, force=True)  # small; segments were reserved
            event = self.created_event(location, task_id, job_id, data=location.inline)
            self.make_durable_then_ready([location], [event])
            return
        if not durable:
            event = self.created_event(location, task_id, job_id)
            self.make_durable_then_ready([location], [event])
            return

        async def keep_on_disk(name: str) -> None:
            copy = self.durable_dir / location.object_id
            path: Path | None = copy
            try:
                self.durable_dir.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(shm.seal_segment, name)  # recovery checks the copy
                await asyncio.to_thread(shutil.copyfile, shm.SHM_DIR / name, copy)
            except OSError as exc:  # the put stands, without a copy on disk
                log.warning(
                    "put %s could not be made durable in %s: %s",
                    location.object_id,
                    self.durable_dir,
                    exc,
                )
                if path is not None:  # a half-written copy must not stay
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
                path = None
            event = self.created_event(
                location, task_id, job_id, durable_path=str(path) if path else None
            )
            self.make_durable_then_ready([location], [event])

        self._spawn(keep_on_disk(location.shm_name))

    def reserve(self, conn: Connection, request_id: int, size: int) -> None:
        """Admits a segment of ``size`` bytes; the reply names a recycled segment to
        write into, or None for a new one."""
        if size < 0:  # a reservation given back after a failed write
            self.objects.uncharge(-size)
            return
        overflow = self.objects.used + self.pool.bytes + size - self.objects.capacity
        if overflow > 0:
            self.pool.evict(overflow)
        if self.objects.charge(size):
            conn.send(p.Reply(request_id, self.pool.take(size)))
            return
        if size > self.objects.capacity:
            conn.send(p.Reply(request_id, error=self.spiller.store_full(size)))
            return

        async def spill_then_reserve() -> None:  # full: spill others to disk first
            if await self.spiller.make_room(size):
                conn.send(p.Reply(request_id, self.pool.take(size)))
            else:
                conn.send(p.Reply(request_id, error=self.spiller.store_full(size)))

        self._spawn(spill_then_reserve())

    def created_event(
        self,
        location: p.ObjectLocation,
        task_id: str | None,
        job_id: str | None,
        *,
        data: bytes | None = None,
        durable_path: str | None = None,
    ) -> Event:
        payload: dict[str, Any] = {"size_bytes": location.size, "inline": location.shm_name is None}
        if task_id:
            payload["task_id"] = task_id
        if durable_path:
            payload["durable_path"] = durable_path
        return Event(
            K.OBJECT,
            location.object_id,
            "created",
            payload,
            job_id=job_id,
            node_id=self.node_id,
            data=data,
        )

    def make_durable_then_ready(
        self,
        locations: list[p.ObjectLocation],
        events: list[Event],
        owner: Connection | None = None,
        *,
        urgent: bool = True,
    ) -> None:
        """Once ``events`` are durable, the objects become ready; ``owner`` (the
        submitter of the task that made them) is sent their locations. Not ``urgent``:
        the owner has them already (a direct actor call's answer), so the commit may
        wait for others (see controlplane/node/actors.py, "Direct calls")."""
        for location in locations:
            self.objects.expect(location.object_id, location)
        durable = self.recorder.log_durable(events, urgent=urgent)

        def publish(future: asyncio.Future[list[int]]) -> None:
            error = future.exception()
            published = []
            for location in locations:
                if error is not None:
                    location = p.ObjectLocation(
                        location.object_id,
                        error=p.ErrorInfo(
                            "system", f"the GCS could not record the object: {error}"
                        ),
                    )
                self.objects.ready(location)
                published.append(location)
            if owner is not None:
                owner.send(p.ObjectsReady(published))
            self._schedule()

        durable.add_done_callback(publish)

    def push(self, conn: Connection, object_ids: list[str]) -> None:
        for object_id in object_ids:

            def push(oid: str = object_id) -> None:
                conn.send(p.ObjectsReady([self.objects.location(oid)]))

            self.objects.on_ready(object_id, push)

    def _freed(self, location: p.ObjectLocation) -> None:
        if location.shm_name is not None and not self.pool.keep(location.shm_name, location.size):
            shm.unlink_segment(location.shm_name)
        self.recorder.log([Event(K.OBJECT, location.object_id, "freed", {}, node_id=self.node_id)])

    def _bring_back(self, object_id: str, where: Elsewhere) -> None:
        """Something here waits for an object whose bytes are not in the store."""
        if where.kind == "remote":
            self._fetch_remote(object_id, where.where)
        else:
            self.spiller.restore(object_id, where)

    def _drop_elsewhere(self, object_id: str, where: Elsewhere) -> None:
        """A freed object's copy outside the store goes too."""
        if where.kind == "remote":
            self._release_remote(where.where, object_id)
        else:
            with contextlib.suppress(OSError):
                os.unlink(where.where)
            self.object_event(object_id, "freed", {})

    def object_event(self, object_id: str, event_type: str, payload: dict[str, Any]) -> None:
        self.recorder.log([Event(K.OBJECT, object_id, event_type, payload, node_id=self.node_id)])
