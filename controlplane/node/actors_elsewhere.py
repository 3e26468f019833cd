"""Actors made on this node that live on another: their creation is spilled and placed
by the global schedulers, like a task's; their calls go to the actor's node through
the log (``forwarded``, the spec in its data), which that node reads in log order, so
each caller's order holds; their results come back as a spilled task's do. Their
state follows the actor's node's events (``alive``, ``restarting``, ``dead``).

``ActorsElsewhere`` owns these actors (``ActorElsewhere``: where it lives, the calls
waiting for its placement, its death) from the moment the actor director hands one
over (actors.py) until it dies, and the pins on its constructor's arguments, which
stay here while it lives (a restart on another node pulls them again from here).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from controlplane.eventlog import EntityKind, Event, RecordedEvent
from controlplane.node.actor_names import ActorNames
from controlplane.node.recorder import EventRecorder
from controlplane.node.spilled_tasks import SpilledTasks
from controlplane.node.task_table import Connection, TaskRecord, TaskTable
from dataplane import protocol as p
from dataplane.object_table import ObjectTable

K = EntityKind


@dataclass
class ActorElsewhere:
    actor_id: str
    creation: TaskRecord
    owner: Connection | None
    restarts: int = 0
    state: str = "PENDING_CREATION"  # then ALIVE / RESTARTING, as its node says
    placed_on: str | None = None  # that node, once the global schedulers placed it
    queue: deque[TaskRecord] = field(default_factory=deque)  # calls waiting for that
    death: p.ErrorInfo | None = None

    @property
    def options(self) -> p.ActorOptions:
        return self.creation.spec.actor_options or p.ActorOptions("", {})


def call_retries(spec: p.TaskSpec, options: p.ActorOptions) -> int:
    """How often a call may be sent again: its own max_task_retries (a method option),
    else its actor's (-1: forever)."""
    own = getattr(spec, "max_task_retries", None)
    return options.max_task_retries if own is None else own


class CallEnds(Protocol):
    """What these actors ask of the node: a call that fails here."""

    def finish_failed(self, record: TaskRecord, error: p.ErrorInfo, *, log_event: bool) -> None: ...


class ActorsElsewhere:
    def __init__(
        self,
        node_id: str,
        recorder: EventRecorder,
        objects: ObjectTable,
        tasks: TaskTable,
        spills: SpilledTasks,
        names: ActorNames,
        node: CallEnds,
    ) -> None:
        self.node_id = node_id
        self.recorder = recorder
        self.objects = objects
        self.tasks = tasks
        self.spills = spills
        self.names = names
        self.node = node
        self._actors: dict[str, ActorElsewhere] = {}

    def __contains__(self, actor_id: object) -> bool:
        return actor_id in self._actors

    def alive(self) -> int:
        return sum(1 for a in self._actors.values() if a.death is None)

    def take(
        self,
        creation: TaskRecord,
        owner: Connection | None,
        *,
        restarts: int = 0,
        calls: Iterable[TaskRecord] = (),
    ) -> None:
        """The actor of ``creation`` will live on another node (its constructor's
        arguments pinned here): its creation is spilled once they are ready, and
        ``calls`` made so far wait for its placement."""
        assert creation.spec.actor_id is not None  # an actor's creation task
        actor = ActorElsewhere(creation.spec.actor_id, creation, owner, restarts)
        actor.queue.extend(calls)
        self._actors[actor.actor_id] = actor
        if not creation.pending_deps:
            self.spills.spill(creation)
            return
        for dep in list(creation.pending_deps):

            def ready(d: str = dep) -> None:
                creation.pending_deps.discard(d)
                if not creation.pending_deps:
                    self.spills.spill(creation)

            self.objects.on_ready(dep, ready)

    def call(self, record: TaskRecord) -> None:
        """A call: its actor's node runs it, in the order of the log; the result comes
        back as a spilled task's does. Calls wait here until the actor is placed."""
        actor = self._actors[record.spec.actor_id or ""]
        if actor.death is not None:
            self.node.finish_failed(record, actor.death, log_event=True)
            return
        record.state = "SPILLED"
        record.retries_left = call_retries(record.spec, actor.options)
        self.spills.remember(record)
        if actor.placed_on is None:
            actor.queue.append(record)
        else:
            self._forward(actor, record)

    def cancel_call(self, record: TaskRecord) -> None:
        """``ray.cancel`` of a call here: one waiting for its actor to be placed is
        dropped; one forwarded ends cancelled for its caller, as a spilled task does
        (its actor's node is not interrupted: it runs it, and the result is not
        wanted)."""
        actor = self._actors.get(record.spec.actor_id or "")
        if actor is None or actor.death is not None or record.state != "SPILLED":
            return
        if record in actor.queue:
            actor.queue.remove(record)
        self.spills.forget(record.spec.task_id)
        self.node.finish_failed(record, p.ErrorInfo.cancelled(record.spec.name), log_event=True)

    def kill(self, actor_id: str, no_restart: bool, cause: str = "") -> None:
        """Its node does it: a ``kill_requested`` event it reads."""
        actor = self._actors.get(actor_id)
        if actor is None or actor.death is not None:
            return
        # (addressed to its node; to every node while it is not placed yet)
        payload: dict[str, Any] = {"no_restart": no_restart, "to_node": actor.placed_on or "*"}
        if cause:
            payload["cause"] = cause
        job_id = actor.creation.spec.job_id
        event = Event(
            K.ACTOR, actor_id, "kill_requested", payload, job_id=job_id, node_id=self.node_id
        )
        self.recorder.log([event])

    def owner_gone(self, conn: Connection) -> None:
        """Actors die with the process that created them, unless detached."""
        for actor in list(self._actors.values()):
            options = actor.creation.spec.actor_options
            if actor.owner is conn and not (options and options.detached):
                self.kill(actor.actor_id, True, "its owner exited")

    def placed(self, creation: TaskRecord, node_id: str) -> None:
        """The actor was placed on ``node_id``: the calls that waited for it go
        there, in order."""
        actor = self._actors.get(creation.spec.actor_id or "")
        if actor is None:
            return
        actor.placed_on = node_id
        waiting, actor.queue = list(actor.queue), deque()
        for record in waiting:
            record.state = "SPILLED"
            self.spills.remember(record)
            self._forward(actor, record)

    def node_lost(self, node_id: str) -> None:
        """The actors that lived on ``node_id`` are made again elsewhere, or die."""
        for actor in list(self._actors.values()):
            if actor.placed_on == node_id and actor.death is None:
                self._lost_with_node(actor, node_id)

    def creation_placed_on_dead_node(self, creation: TaskRecord, node_id: str) -> None:
        actor = self._actors.get(creation.spec.actor_id or "")
        if actor is not None and actor.death is None:
            self._lost_with_node(actor, node_id)

    def remote_event(self, event: RecordedEvent) -> None:
        """The actor's node's events say how it is."""
        actor = self._actors.get(event.entity_id)
        if actor is None or actor.death is not None:
            return
        if event.event_type in ("alive", "restarting"):
            actor.state = "ALIVE" if event.event_type == "alive" else "RESTARTING"
        elif event.event_type == "dead":
            cause = f"the actor {actor.actor_id} died: {event.payload.get('cause', '')}"
            self._buried(actor, p.ErrorInfo("actor_died", cause, function_name=actor.actor_id))

    def _lost_with_node(self, actor: ActorElsewhere, node_id: str) -> None:
        """The node it lived on died: it is made again on another node if
        ``max_restarts`` allows (its constructor re-run; ``restarting`` says so), and
        the calls forwarded to it and not finished are sent to the new instance, in
        their order, as ``max_task_retries`` allows (each may have begun there: it
        counts as a retry); otherwise it is dead and they fail."""
        cause = f"its node {node_id} died"
        calls = self.spills.calls_of(actor.actor_id)
        for record in calls:
            self.spills.forget(record.spec.task_id)
        creation = actor.creation
        self.spills.forget(creation.spec.task_id)
        limit = actor.options.max_restarts
        if limit != -1 and actor.restarts >= limit:
            actor.queue.extendleft(reversed(calls))  # failed with the actor, in order
            self._died(actor, cause)
            return
        actor.restarts += 1
        actor.state, actor.placed_on = "RESTARTING", None
        self.recorder.log(
            [
                Event(
                    K.ACTOR,
                    actor.actor_id,
                    "restarting",
                    {"attempt": actor.restarts, "cause": cause},
                    job_id=creation.spec.job_id,
                    node_id=self.node_id,
                )
            ]
        )
        resent = []
        for record in calls:
            if record.retries_left == 0:
                self.node.finish_failed(
                    record,
                    p.ErrorInfo(
                        "actor_died",
                        f"the actor {actor.actor_id} died while the call was on its node "
                        f"(max_task_retries=0): {cause}",
                        function_name=actor.actor_id,
                    ),
                    log_event=True,
                )
                continue
            self.tasks.retry_attempt(record, f"the actor restarted: {cause}")
            resent.append(record)
        actor.queue.extendleft(reversed(resent))  # before calls made since, in order
        for record in resent:
            self.spills.remember(record)  # forwarded again once placed
        # placed again (a new attempt: a new placement), its calls forwarded once it is
        self.tasks.keep(creation)  # its constructor may have finished: in hand again
        creation.placed_on = None
        self.tasks.next_attempt(creation, f"the actor restarts: {cause}")
        self.spills.spill(creation)

    def _died(self, actor: ActorElsewhere, cause: str) -> None:
        """Dead for good, declared here (its node died, no restarts left): a ``dead``
        event says so."""
        dead = Event(
            K.ACTOR,
            actor.actor_id,
            "dead",
            {"cause": cause[:2000]},
            job_id=actor.creation.spec.job_id,
            node_id=self.node_id,
        )
        self.recorder.log([dead])
        death = p.ErrorInfo(
            "actor_died", f"the actor {actor.actor_id} died: {cause}", function_name=actor.actor_id
        )
        never_lived = actor.state == "PENDING_CREATION"
        self._buried(actor, death)
        if never_lived and actor.creation.spec.task_id in self.tasks:
            self.node.finish_failed(actor.creation, death, log_event=True)

    def _buried(self, actor: ActorElsewhere, death: p.ErrorInfo) -> None:
        """Every waiting call fails with its death; its name and arguments go."""
        actor.death, actor.state = death, "DEAD"
        self.names.forget(actor.actor_id)
        pending, actor.queue = list(actor.queue), deque()
        for record in pending:
            self.node.finish_failed(record, death, log_event=True)
        spec = actor.creation.spec
        for object_id in (*spec.dependencies(), *spec.contained_refs):
            self.objects.unpin(object_id)

    def _forward(self, actor: ActorElsewhere, record: TaskRecord) -> None:
        """Hands a call to the actor's node through the log (``forwarded``, the spec in
        its data); that node reads them in log order, so each caller's order holds."""
        spec = record.spec
        self.recorder.log(
            [
                Event(
                    K.TASK,
                    spec.task_id,
                    "forwarded",
                    {
                        "actor_id": actor.actor_id,
                        "to_node": actor.placed_on,
                        "attempt": record.attempt,
                    },
                    job_id=spec.job_id,
                    node_id=self.node_id,
                    data=p.encode(spec),
                )
            ]
        )
