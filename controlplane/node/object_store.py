"""The node's objects as the log sees them: puts (small ones into the log, durable ones
copied to disk first), room reserved in the store for writers (spilling others when
full; a writer's room it never used goes back when it gives it back or its
connection ends), and the rule that an object becomes ready -- visible to ``get``,
``wait`` and its owner -- only once its ``created`` event is durable. It owns the
object table, the store's memory and the spiller (dataplane/), and logs what they
report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane.eventlog import EntityKind, Event
from controlplane.node.recorder import EventRecorder
from dataplane import protocol as p
from dataplane.object_table import Elsewhere, ObjectTable
from dataplane.spilling import Spiller, copy_out
from dataplane.store_memory import StoreMemory

if TYPE_CHECKING:
    from controlplane.node.task_table import Connection

log = logging.getLogger("cairn.node")
K = EntityKind


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
        # the job of each object made here (or a value of a task spilled from here, or an
        # object pulled from a node that named its job), until it is freed: its later
        # events name it
        # (an entity's events in one shard: migrations/sql/0020_entity_jobs.up.sql)
        self._jobs: dict[str, str] = {}
        self.objects = ObjectTable(
            capacity,
            on_free=self._freed,
            on_wanted=self._bring_back,
            on_dropped=self._drop_elsewhere,
            on_release=lambda location: self.memory.free_location(location),
        )
        self.memory = StoreMemory(node_id, self.objects)
        self.spiller = Spiller(
            node_id,
            spill_dir,
            self.objects,
            self.memory,
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
        if location.region is None:
            self.objects.charge(location.size, force=True)  # small; others were reserved
            event = self.created_event(location, task_id, job_id, data=location.inline)
            self.make_durable_then_ready([location], [event])
            return
        if not durable:
            event = self.created_event(location, task_id, job_id)
            self.make_durable_then_ready([location], [event])
            return

        async def keep_on_disk() -> None:
            copy = self.durable_dir / location.object_id
            path: Path | None = copy
            try:
                self.durable_dir.mkdir(parents=True, exist_ok=True)
                # (the put's writer holds it until its created event: its bytes stay)
                await asyncio.to_thread(copy_out, self.node_id, location, copy)
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

        self._spawn(keep_on_disk())

    def reserve(self, conn: Connection, request_id: int, size: int) -> None:
        """Room for an object of ``size`` bytes, which ``conn``'s process will write:
        the reply is ``(region, offset)``. The range is the writer's until it sends the
        object (``taken``) or gives it back; when its connection ends (it died while
        writing), the node takes back what it did not send."""
        if size > self.objects.capacity:
            conn.send(p.Reply(request_id, error=self.spiller.store_full(size)))
            return
        where = self.memory.take(size)
        if where is not None:
            conn.reserved[where] = size
            conn.send(p.Reply(request_id, where))
            return

        async def spill_then_reserve() -> None:  # full: spill others to disk first
            where = await self.spiller.make_room(size)
            if where is None:
                conn.send(p.Reply(request_id, error=self.spiller.store_full(size)))
            elif conn.closed:  # the writer went meanwhile
                self.memory.give_back(*where, size)
            else:
                conn.reserved[where] = size
                conn.send(p.Reply(request_id, where))

        self._spawn(spill_then_reserve())

    def give_back(self, conn: Connection, region: int, offset: int) -> None:
        """A reserved range its writer did not use (the write failed)."""
        size = conn.reserved.pop((region, offset), None)
        if size is not None:
            self.memory.give_back(region, offset, size)

    def taken(self, conn: Connection, locations: list[p.ObjectLocation]) -> None:
        """Objects ``conn``'s process wrote into ranges it reserved: they are objects'
        ranges now, freed with their objects."""
        for location in locations:
            if location.region is not None:
                conn.reserved.pop((location.region, location.offset), None)

    def writer_gone(self, conn: Connection) -> None:
        """``conn``'s process is gone: what it reserved and never sent is free again."""
        reserved, conn.reserved = conn.reserved, {}
        for (region, offset), size in reserved.items():
            self.memory.give_back(region, offset, size)

    def discard(self, locations: list[p.ObjectLocation]) -> None:
        """Results nobody will have (a task's stale attempt): their room goes back."""
        for location in locations:
            self.memory.give_back_location(location)

    def created_event(
        self,
        location: p.ObjectLocation,
        task_id: str | None,
        job_id: str | None,
        *,
        data: bytes | None = None,
        durable_path: str | None = None,
        kept_at: str | None = None,
        owner_node: str | None = None,
    ) -> Event:
        """``kept_at``: the address of this node, for an object kept here for a task's
        owner on another node (``owner_node``, whom the event is addressed to); then the
        event also says where in the store it is (what a daemon that restarts here
        adopts: node/store_adoption.py)."""
        if job_id is not None:
            self._jobs[location.object_id] = job_id
        payload: dict[str, Any] = {"size_bytes": location.size, "inline": location.region is None}
        if task_id:
            payload["task_id"] = task_id
        if durable_path:
            payload["durable_path"] = durable_path
        if owner_node is not None:
            payload["owner_node"] = owner_node
        if kept_at is not None:
            payload["address"] = kept_at
            if location.contained:  # (the owner's node pins them while it holds this)
                payload["contained"] = list(location.contained)
            if location.region is not None:
                payload.update(region=location.region, offset=location.offset)
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
        self.memory.free_location(location)
        self.object_event(location.object_id, "freed", {})

    def _bring_back(self, object_id: str, where: Elsewhere) -> None:
        """Something here waits for an object whose bytes are not in the store."""
        if where.kind == "remote":
            self._fetch_remote(object_id, where.where)
        else:
            self.spiller.restore(object_id, where)

    def _drop_elsewhere(self, object_id: str, where: Elsewhere) -> None:
        """A freed object's copy outside the store goes too."""
        if where.kind == "remote":  # (its node says what became of it: nothing here)
            self._release_remote(where.where, object_id)
            self._jobs.pop(object_id, None)
        else:
            with contextlib.suppress(OSError):
                os.unlink(where.where)
            self.object_event(object_id, "freed", {})

    def remember_job(self, object_id: str, job_id: str) -> None:
        """``job_id`` owns ``object_id``, made elsewhere (a value of a task this node
        spilled, an object pulled from a node that named its job): what this node later
        says of it (transferred, freed) names the job, so the log need not look it up
        (on a log on several servers, on every one)."""
        self._jobs[object_id] = job_id

    def job_of(self, object_id: str) -> str | None:
        return self._jobs.get(object_id)

    def object_event(self, object_id: str, event_type: str, payload: dict[str, Any]) -> None:
        job_id = self._jobs.pop(object_id, None) if event_type == "freed" else None
        event = Event(
            K.OBJECT,
            object_id,
            event_type,
            payload,
            job_id=job_id or self._jobs.get(object_id),
            node_id=self.node_id,
        )
        self.recorder.log([event])
