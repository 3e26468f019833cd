"""Actors this node neither made nor hosts, called from here: a handle passed to a task
placed here, or found by name (``get_actor``), as Ray lets any process call any actor.
Each call goes to the actor's node through the log (``forwarded``, as the calls of an
actor made here that lives elsewhere: actors_elsewhere.py), in the order made here,
and its results come back as a spilled task's do.

``BorrowedActors`` owns what this node knows of such actors (``BorrowedActor``: the
node it lives on as last read, the calls waiting to learn it, its death). Where an
actor lives is read from the log (``actor_whereabouts``): once, then again after its
node died. Its owner, not this node, restarts it: a call in flight on a node that
dies runs again while its retries last (remote_tasks.py, ``_placed_task_lost``), and
calls wait while the actor is being made or restarted; they fail once it is dead, or
once its owner's node died with the actor not alive on another."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from controlplane.eventlog import EntityKind, Event
from controlplane.eventlog.connection import KeptConnection
from controlplane.node.actors_elsewhere import CallEnds, call_retries
from controlplane.node.recorder import EventRecorder
from controlplane.node.spilled_tasks import SpilledTasks
from controlplane.node.task_table import TaskRecord
from controlplane.sql import queries
from dataplane import protocol as p

log = logging.getLogger("cairn.node")

K = EntityKind

FIRST_POLL_S = 0.05  # while the actor is being made or restarted: then doubled
LAST_POLL_S = 1.0
UNKNOWN_FOR_S = 60.0  # an id the log never names: its calls fail after this long


@dataclass
class BorrowedActor:
    actor_id: str
    host: str | None = None  # the node it lives on, as last read from the log
    options: p.ActorOptions | None = None  # its creation's (retries of its calls)
    queue: deque[TaskRecord] = field(default_factory=deque)  # calls waiting for ``host``
    looking: bool = False
    death: p.ErrorInfo | None = None


class BorrowedActors:
    def __init__(
        self,
        node_id: str,
        gcs_url: str,
        recorder: EventRecorder,
        spills: SpilledTasks,
        node: CallEnds,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.node_id = node_id
        self.gcs = KeptConnection(gcs_url)  # (the lookups poll: one connection for all)
        self.recorder = recorder
        self.spills = spills
        self.node = node
        self._spawn = spawn
        self._actors: dict[str, BorrowedActor] = {}

    def __contains__(self, actor_id: object) -> bool:
        return actor_id in self._actors

    def call(self, record: TaskRecord) -> None:
        """A call of an actor that lives on another node: sent there once this node
        knows which (calls made before wait, so the order holds)."""
        actor_id = record.spec.actor_id or ""
        actor = self._actors.setdefault(actor_id, BorrowedActor(actor_id))
        if actor.death is not None:
            self.node.finish_failed(record, actor.death, log_event=True)
        elif actor.host is None or actor.queue:
            actor.queue.append(record)
            self._look_up(actor)
        else:
            self._forward(actor, record)

    def kill(self, actor_id: str, no_restart: bool) -> None:
        """Its node does it (``kill_requested``, addressed to it; to every node while
        this one does not know which)."""
        actor = self._actors.get(actor_id)
        if actor is not None and actor.death is not None:
            return
        host = actor.host if actor is not None else None
        event = Event(
            K.ACTOR,
            actor_id,
            "kill_requested",
            {"no_restart": no_restart, "to_node": host or "*"},
            node_id=self.node_id,
        )
        self.recorder.log([event])

    def node_lost(self, node_id: str) -> None:
        """The actors that lived on ``node_id`` are looked up again at their next call
        (their owners make them again elsewhere, or they die)."""
        for actor in self._actors.values():
            if actor.host == node_id:
                actor.host = None

    def _forward(self, actor: BorrowedActor, record: TaskRecord) -> None:
        assert actor.host is not None
        spec = record.spec
        record.state = "SPILLED"
        record.placed_on = actor.host  # (lost with that node: remote_tasks.py)
        if record.attempt == 0:  # (a call sent again keeps what is left of its retries)
            record.retries_left = call_retries(spec, actor.options or p.ActorOptions("", {}))
        self.spills.remember(record)
        self.recorder.log(
            [
                Event(
                    K.TASK,
                    spec.task_id,
                    "forwarded",
                    {"actor_id": actor.actor_id, "to_node": actor.host, "attempt": record.attempt},
                    job_id=spec.job_id,
                    node_id=self.node_id,
                    data=p.encode(spec),
                )
            ]
        )

    def _look_up(self, actor: BorrowedActor) -> None:
        if not actor.looking:
            actor.looking = True
            self._spawn(self._find(actor))

    async def _find(self, actor: BorrowedActor) -> None:
        """Reads where the actor lives until it is alive on a live node (its waiting
        calls then go there, in order) or dead (they fail)."""
        poll, waited = FIRST_POLL_S, 0.0
        try:
            while True:
                try:
                    found = await self._whereabouts(actor.actor_id)
                except Exception as exc:  # (the GCS restarting: read again)
                    log.warning("where actor %s lives could not be read: %s", actor.actor_id, exc)
                    found = None
                if found is not None and self._settled(actor, found, waited):
                    return
                await asyncio.sleep(poll)
                waited += poll
                poll = min(poll * 2, LAST_POLL_S)
        finally:
            actor.looking = False

    def _settled(self, actor: BorrowedActor, found: dict[str, Any], waited: float) -> bool:
        state = found.get("state")
        if found.get("creation") is not None:
            actor.options = p.submitted_spec(found["creation"])[0].actor_options
        if state == "dead":
            self._died(actor, f"the actor {actor.actor_id} died: {found.get('cause') or ''}")
        elif state == "alive" and not found["node_dead"]:
            actor.host = found["node"]
            waiting, actor.queue = list(actor.queue), deque()
            for record in waiting:
                self._forward(actor, record)
        elif found.get("owner_dead"):
            self._died(
                actor,
                f"the actor {actor.actor_id} is gone: the node of its owner died while it "
                "was not alive on another node",
            )
        elif state is None and waited >= UNKNOWN_FOR_S:
            self._died(actor, f"no actor {actor.actor_id} in the cluster's log")
        else:
            return False  # being made or restarted: its calls wait
        return True

    def _died(self, actor: BorrowedActor, cause: str) -> None:
        actor.death = p.ErrorInfo("actor_died", cause, function_name=actor.actor_id)
        waiting, actor.queue = list(actor.queue), deque()
        for record in waiting:
            self.node.finish_failed(record, actor.death, log_event=True)

    async def _whereabouts(self, actor_id: str) -> dict[str, Any]:
        async with self.gcs.use() as conn:
            row = await conn.fetchrow(queries["actor_whereabouts"], actor_id)
        return dict(row) if row is not None else {"state": None}
