"""Actors on a node: each lives in a dedicated worker process, started for it; its
method calls are sent there in the order the daemon received them (so each caller's
calls run in its submission order), up to max_concurrency running at once and
_PIPELINE_DEPTH more sent ahead. The life of every actor is in the log:
``creation_requested``, ``scheduled``, ``alive`` (with its worker), ``dead`` (cause).

``ActorDirector`` owns every actor of the node; what it asks of the node (a call's
end, a worker to run on, a spill) goes through ``ActorHost``.

Direct calls. A caller on this node that has an alive actor's route (WatchActor ->
ActorRoute) sends each call straight to the actor's worker and the same message to the
daemon (SubmitDirectCall), which records it as sent (``submitted`` and ``running``,
the call in ``running``) without sending it on. The worker tells the daemon the outcome
(TaskDone), then answers the caller directly, so the caller sees the result before its
``finished`` and ``created`` events are durable: they are written behind, committed
within the appender's linger (5 ms) with the other events queued by then. What a crash
can lose: if the node daemon or PostgreSQL crashes in that window, the log lacks the
last direct calls' ``finished`` (and perhaps ``submitted`` / ``running``) events, and a
fold shows those calls as submitted or running on an actor that died with the node,
although their callers saw results. Nothing else is written behind for them: a call
the worker did not answer (its process died, exit_actor()) is settled here, durably,
before its caller hears. Actors that replay their calls on restart never take direct
calls (their replay reads finished calls from the log, so those must be durable).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from controlplane.eventlog import EntityKind, Event, RecordedEvent
from controlplane.node.actor_names import ActorNames
from controlplane.node.actor_replay import calls_to_replay, drop_returns, internal_call
from controlplane.node.local_scheduler import LocalScheduler
from controlplane.node.placement_groups import PlacementGroups
from controlplane.node.recorder import EventRecorder
from controlplane.node.task_table import Connection, TaskRecord, TaskTable
from controlplane.node.workers import WorkerHandle, WorkerPool
from dataplane import protocol as p
from dataplane.begun_calls import begun_calls_path, read_begun
from dataplane.object_table import ObjectTable

K = EntityKind
log = logging.getLogger("cairn.node")
# Calls sent to an actor's worker ahead of those it is running, so that it never waits
# for the daemon between calls; the worker still runs them in the order sent, at most
# max_concurrency at a time. If the actor's process dies, calls sent but not begun are
# sent again to the new instance without using up max_task_retries.
_PIPELINE_DEPTH = 64


@dataclass
class ActorRecord:
    actor_id: str
    creation: TaskRecord
    owner: Connection | None  # None: hosted here for a driver of another node
    state: str = "PENDING_CREATION"
    elsewhere: bool = False  # made here, lives on another node (calls go through the log)
    placed_on: str | None = None  # that node, once the global schedulers placed it
    worker: WorkerHandle | None = None
    creation_sent: bool = False
    reported_infeasible: bool = False
    queue: deque[TaskRecord] = field(default_factory=deque)
    running: dict[str, TaskRecord] = field(default_factory=dict)  # task id -> call
    death: p.ErrorInfo | None = None
    restarts: int = 0
    replaying: bool = False  # its earlier calls are being read from the log
    calls_since_checkpoint: int = 0
    watchers: list[Connection] = field(default_factory=list)  # waiting for its route
    # the last dead worker's id and the calls it had begun and not answered (None: not
    # known), for direct calls whose copies come after its death
    last_begun: tuple[str, set[str] | None] = ("", None)

    @property
    def options(self) -> p.ActorOptions:
        return self.creation.spec.actor_options or p.ActorOptions("", {})


class ActorHost(Protocol):
    """What the actors ask of the node: a call's end (``finish_ok``/``finish_failed``,
    which publish its results), sending work to a worker, and what crosses to other
    nodes (spills, and the calls of actors living elsewhere, followed as spills are)."""

    def finish_ok(self, record: TaskRecord, returns: list[p.ObjectLocation]) -> None: ...

    def finish_failed(self, record: TaskRecord, error: p.ErrorInfo, *, log_event: bool) -> None: ...

    def failed_dependency(self, record: TaskRecord) -> p.ErrorInfo | None: ...

    def run(self, record: TaskRecord, handle: WorkerHandle) -> None: ...

    def running_event(self, record: TaskRecord, worker_id: str) -> Event: ...

    def actor_goes_elsewhere(self, creation: TaskRecord) -> bool: ...

    def spill(self, record: TaskRecord) -> None: ...

    def remember_spilled(self, record: TaskRecord) -> None:
        """Follows ``record`` (a call forwarded to another node) as a spilled task."""

    def forget_spilled(self, task_id: str) -> TaskRecord | None: ...

    def spilled_calls_of(self, actor_id: str) -> list[TaskRecord]: ...

    def pull_then(self, record: TaskRecord, address: str, then: Callable[[], None]) -> None:
        """Brings the record's arguments from the node at ``address``, then ``then()``."""


class ActorDirector:
    """Owns the node's actors (``ActorRecord``: state, worker, queued and running
    calls, restarts), made here or hosted here for another node, and their names."""

    def __init__(
        self,
        node_id: str,
        gcs_url: str,
        session_dir: Path,
        recorder: EventRecorder,
        objects: ObjectTable,
        tasks: TaskTable,
        scheduler: LocalScheduler,
        worker_pool: WorkerPool,
        placement_groups: PlacementGroups,
        node: ActorHost,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.node_id = node_id
        self.gcs_url = gcs_url
        self.session_dir = session_dir
        self.recorder = recorder
        self.objects = objects
        self.tasks = tasks
        self.scheduler = scheduler
        self.worker_pool = worker_pool
        self.placement_groups = placement_groups
        self.node = node
        self._spawn = spawn
        self.actors: dict[str, ActorRecord] = {}
        self.names = ActorNames(self.actors.get)
        self._unscheduled: set[str] = set()  # created, constructor not sent yet
        # a direct call's TaskDone that came before the caller's copy of the call
        self._early_direct_done: dict[str, p.TaskDone] = {}

    def alive(self) -> int:
        return sum(1 for a in self.actors.values() if a.death is None)

    def waiting_for_resources(self) -> int:
        return len(self._unscheduled)

    def dispatch_waiting(self) -> None:
        """Actors whose constructor waits for resources try again (a scheduler pass)."""
        for actor_id in list(self._unscheduled):
            self._dispatch(self.actors[actor_id])

    def task_done(self, handle: WorkerHandle, done: p.TaskDone) -> None:
        """The actor's worker ``handle`` finished a call (or its constructor)."""
        actor = self.actors.get(handle.actor_id or "")
        if actor is not None:
            self._task_done(actor, done)

    # -- creation ------------------------------------------------------------------

    def create(self, conn: Connection, creation: TaskRecord) -> None:
        spec = creation.spec
        assert spec.actor_id is not None  # an actor's creation task
        actor = ActorRecord(spec.actor_id, creation, conn)
        self.actors[actor.actor_id] = actor
        self._unscheduled.add(actor.actor_id)
        options = spec.actor_options
        payload: dict[str, Any] = {"class_name": spec.name.removesuffix(".__init__")}
        if options is not None and options.name is not None:
            payload["name"] = options.name
            payload["namespace"] = self.names.namespace(options.namespace, spec.job_id)
        self.recorder.log(
            [
                Event(
                    K.ACTOR,
                    actor.actor_id,
                    "creation_requested",
                    payload,
                    job_id=spec.job_id,
                    node_id=self.node_id,
                )
            ]
        )
        # the constructor's arguments stay pinned while the actor lives: a restart
        # runs the constructor again
        for object_id in (*spec.dependencies(), *spec.contained_refs):
            self.objects.pin(object_id)
        if self.node.actor_goes_elsewhere(creation):  # placed by the global schedulers
            actor.elsewhere = True
            self._unscheduled.discard(actor.actor_id)
            self._when_deps_ready(creation, lambda: self.node.spill(creation))
            return
        actor.worker = self.worker_pool.start(actor_id=actor.actor_id)
        for dep in list(creation.pending_deps):
            self.objects.on_ready(dep, functools.partial(self._dep_ready, actor, creation, dep))

    def _dep_ready(self, actor: ActorRecord, record: TaskRecord, dep: str) -> None:
        record.pending_deps.discard(dep)
        self._dispatch(actor)

    def worker_connected(self, handle: WorkerHandle) -> None:
        actor = self.actors.get(handle.actor_id or "")
        if actor is not None:
            self._dispatch(actor)

    # -- calls ---------------------------------------------------------------------

    def _move_elsewhere(self, actor: ActorRecord) -> None:
        """The actor will live on another node: its worker here goes (not a crash), and
        its creation is spilled to be placed there."""
        actor.elsewhere = True
        self._unscheduled.discard(actor.actor_id)
        self._tell_watchers(actor)
        handle, actor.worker = actor.worker, None
        if handle is not None:
            with contextlib.suppress(ProcessLookupError):
                handle.process.kill()
        self._when_deps_ready(actor.creation, lambda: self.node.spill(actor.creation))

    def _when_deps_ready(self, record: TaskRecord, then: Any) -> None:
        if not record.pending_deps:
            then()
            return
        for dep in list(record.pending_deps):

            def ready(d: str = dep) -> None:
                record.pending_deps.discard(d)
                if not record.pending_deps:
                    then()

            self.objects.on_ready(dep, ready)

    def call(self, record: TaskRecord) -> None:
        actor = self.actors.get(record.spec.actor_id or "")
        if actor is not None and actor.elsewhere and actor.death is None:
            # its node runs it, in the order of the log; the result comes back as a
            # spilled task's does. Calls wait here until the actor is placed.
            record.state = "SPILLED"
            record.retries_left = actor.options.max_task_retries
            self.node.remember_spilled(record)
            if actor.placed_on is None:
                actor.queue.append(record)
            else:
                self._forward(actor, record)
            return
        if actor is None:
            self.node.finish_failed(
                record,
                p.ErrorInfo("actor_died", f"no actor {record.spec.actor_id} on this node"),
                log_event=True,
            )
            return
        if actor.death is not None:
            self.node.finish_failed(record, actor.death, log_event=True)
            return
        record.retries_left = actor.options.max_task_retries
        actor.queue.append(record)
        for dep in list(record.pending_deps):
            self.objects.on_ready(dep, functools.partial(self._dep_ready, actor, record, dep))
        self._dispatch(actor)

    def _dispatch(self, actor: ActorRecord) -> None:
        """Sends the actor its next piece of work, if it can take it."""
        handle = actor.worker
        if actor.death is not None or handle is None or handle.conn is None:
            return
        if actor.state in ("PENDING_CREATION", "RESTARTING"):
            creation = actor.creation
            if actor.creation_sent or creation.pending_deps:
                return
            bundle = None
            if creation.spec.strategy and creation.spec.strategy[0] == "PLACEMENT_GROUP":
                if self.placement_groups.bundle_elsewhere(
                    creation
                ):  # its bundle is on another node
                    self._move_elsewhere(actor)
                    return
                bundle, never = self.placement_groups.bundle_for(creation)
                if never is not None:
                    self._died(actor, f"it cannot be scheduled: {never}")
                    return
                if bundle is None:
                    return  # tried again whenever the group is ready or frees resources
            elif not self.scheduler.resources.available_for(creation.spec.resources):
                if not self.scheduler.resources.fits_total(creation.spec.resources):
                    self._report_infeasible(actor)
                return  # tried again whenever resources are released
            self.scheduler.take(creation, bundle)
            actor.creation_sent = True
            self._unscheduled.discard(actor.actor_id)
            self.recorder.log(
                [Event(K.ACTOR, actor.actor_id, "scheduled", {}, node_id=self.node_id)]
            )
            self.node.run(creation, handle)
            return
        if actor.replaying:
            return  # its earlier calls go first, once read from the log
        limit = actor.options.max_concurrency + _PIPELINE_DEPTH
        while len(actor.running) < limit and actor.queue and not actor.queue[0].pending_deps:
            record = actor.queue.popleft()
            failed = self.node.failed_dependency(record)
            if failed is not None:
                self.node.finish_failed(record, failed, log_event=True)
                continue
            actor.running[record.spec.task_id] = record
            self.node.run(record, handle)

    def _report_infeasible(self, actor: ActorRecord) -> None:
        """Once: the actor needs more than this node has, so it waits (actors are not
        placed on other nodes yet); a warning and an ``infeasible`` event say so."""
        if actor.reported_infeasible:
            return
        actor.reported_infeasible = True
        request = actor.creation.spec.resources
        reason = (
            f"it needs {request} and this node has {self.scheduler.resources.total}; actors run on "
            "their creator's node so far"
        )
        log.warning("actor %s cannot be scheduled: %s", actor.actor_id, reason)
        if actor.owner is not None:
            actor.owner.send(p.Notice(f"actor {actor.actor_id} cannot be scheduled now: {reason}"))
        self.recorder.log(
            [
                Event(
                    K.ACTOR,
                    actor.actor_id,
                    "infeasible",
                    {"reason": reason, "resources": request},
                    node_id=self.node_id,
                )
            ]
        )

    def _task_done(self, actor: ActorRecord, done: p.TaskDone) -> None:
        if done.task_id == actor.creation.spec.task_id:
            creation = actor.creation
            if done.error is not None:
                trace = f"\n{done.error.traceback}" if done.error.traceback else ""
                self._died(actor, f"the actor's constructor raised {done.error.message}{trace}")
                return
            first_start, actor.state = actor.state == "PENDING_CREATION", "ALIVE"
            assert actor.worker is not None
            self.recorder.log(
                [
                    Event(
                        K.ACTOR,
                        actor.actor_id,
                        "alive",
                        {"worker_id": actor.worker.worker_id},
                        node_id=self.node_id,
                    )
                ]
            )
            if first_start:
                self.node.finish_ok(creation, [])
            if actor.options.replay_calls_on_restart and (not first_start or creation.attempt > 0):
                actor.replaying = True
                self._spawn(self._replay_calls(actor))
            self._tell_watchers(actor)
        else:
            record = actor.running.pop(done.task_id, None)
            if record is None:
                if done.direct:  # its caller's copy of the call is still on its way
                    self._early_direct_done[done.task_id] = done
                return
            exiting = done.error is not None and done.error.kind == "actor_exit"
            record.answered = done.direct and not exiting
            if record.internal is not None:
                self._internal_call_done(actor, record, done)
                self._dispatch(actor)
                return
            interval = actor.options.checkpoint_interval
            actor.calls_since_checkpoint += 1
            if interval and actor.calls_since_checkpoint >= interval:
                actor.calls_since_checkpoint = 0
                save = internal_call(actor, "__cairn_save__", [])
                actor.queue.appendleft(TaskRecord(save, None, attempt=-1, internal="checkpoint"))
            if done.error is not None and done.error.kind == "actor_exit":
                self._died(actor, "the actor exited (exit_actor() was called)")
                assert actor.death is not None  # (dead now)
                self.node.finish_failed(record, actor.death, log_event=True)
                return
            if done.error is not None:
                self.node.finish_failed(record, done.error, log_event=True)
            else:
                record.output_digest = done.output_digest
                self.node.finish_ok(record, done.returns)
        self._dispatch(actor)

    # -- direct calls (see the module's docstring) ------------------------------------

    def watch(self, conn: Connection, actor_id: str) -> None:
        actor = self.actors.get(actor_id)
        if actor is not None and self._may_call_directly(actor) and actor.state != "ALIVE":
            actor.watchers.append(conn)  # answered once it is alive (or never will be)
        else:
            conn.send(self._route_of(actor, actor_id))

    def _may_call_directly(self, actor: ActorRecord) -> bool:
        return not (
            actor.elsewhere or actor.death is not None or actor.options.replay_calls_on_restart
        )

    def _route_of(self, actor: ActorRecord | None, actor_id: str) -> p.ActorRoute:
        handle = actor.worker if actor is not None else None
        if (
            actor is None
            or handle is None
            or handle.conn is None
            or actor.state != "ALIVE"
            or not self._may_call_directly(actor)
        ):
            return p.ActorRoute(actor_id, None, None)
        path = p.direct_socket_path(str(self.session_dir), handle.worker_id)
        return p.ActorRoute(actor_id, handle.worker_id, path)

    def _tell_watchers(self, actor: ActorRecord) -> None:
        """Callers waiting for the actor's route get it, now that it is alive, moved to
        another node or dead."""
        watchers, actor.watchers = actor.watchers, []
        route = self._route_of(actor, actor.actor_id)
        for conn in watchers:
            conn.send(route)

    def submit_direct(self, conn: Connection, call: p.SubmitDirectCall) -> None:
        """The daemon's copy of a call sent straight to the worker ``worker_id``: from
        here on it is in the actor's ``running`` calls as if the daemon had sent it, so
        the worker's answer, its death or the actor's settles it like any other."""
        spec, worker_id = call.spec, call.worker_id
        record = self.tasks.submit(conn, spec, direct=True, data=call.frame)
        actor = self.actors.get(spec.actor_id or "")
        record.retries_left = actor.options.max_task_retries if actor is not None else 0
        handle = actor.worker if actor is not None else None
        early = self._early_direct_done.pop(spec.task_id, None)
        if actor is None or (early is None and (handle is None or handle.worker_id != worker_id)):
            self._direct_call_unanswered(actor, record, worker_id)
            return
        record.state, record.worker = "RUNNING", handle
        self.recorder.log([self.node.running_event(record, worker_id)])
        actor.running[spec.task_id] = record
        if early is not None:
            self._task_done(actor, early)

    def _direct_call_unanswered(
        self: Any, actor: ActorRecord | None, record: TaskRecord, worker_id: str
    ) -> None:
        """The worker the call was sent to died without answering it: the call fails
        with the actor's death, or goes to the new instance as interrupted calls do."""
        record.direct = False
        if actor is None or actor.death is not None:
            error = actor.death if actor is not None else None
            self.node.finish_failed(
                record,
                error or p.ErrorInfo("actor_died", f"no actor {record.spec.actor_id} on this node"),
                log_event=True,
            )
            return
        dead_worker, begun = actor.last_begun
        may_have_begun = dead_worker != worker_id or begun is None or record.spec.task_id in begun
        self._interrupted(actor, record, f"its worker {worker_id} died", begun=may_have_begun)
        self._dispatch(actor)

    # -- replay ----------------------------------------------------------------------

    async def _replay_calls(self, actor: ActorRecord) -> None:
        """Re-runs, on the new instance and before any other call, what rebuilds its
        state (node/actor_replay.py); ``replaying`` lists the calls."""
        replayed, payload = await calls_to_replay(self.gcs_url, actor, self.objects)
        if "reason" in payload:
            log.warning("actor %s: replay incomplete: %s", actor.actor_id, payload["reason"])
        self.recorder.log(
            [Event(K.ACTOR, actor.actor_id, "replaying", payload, node_id=self.node_id)]
        )
        actor.queue.extendleft(reversed(replayed))
        actor.replaying = False
        self._dispatch(actor)

    def _internal_call_done(self, actor: ActorRecord, record: Any, done: p.TaskDone) -> None:
        """A replayed call's or a restore's result is dropped; a checkpoint's is logged
        (``checkpointed``, the state in its data) and then dropped here."""
        blob = drop_returns(record, done, self.objects)
        if done.error is not None:
            log.warning(
                "actor %s: %s failed: %s", actor.actor_id, record.spec.name, done.error.message
            )
        elif record.internal == "checkpoint" and blob is not None:
            interval = actor.options.checkpoint_interval
            self.recorder.log(
                [
                    Event(
                        K.ACTOR,
                        actor.actor_id,
                        "checkpointed",
                        {"calls": interval},
                        node_id=self.node_id,
                        data=blob,
                    )
                ]
            )

    # -- death ---------------------------------------------------------------------

    def _died(self, actor: ActorRecord, cause: str) -> None:
        """The actor is dead for good: its process goes, and every pending and later
        call fails with ActorDiedError carrying ``cause``."""
        if actor.death is not None:
            return
        self._unscheduled.discard(actor.actor_id)
        self.names.forget(actor.actor_id)
        actor.death = p.ErrorInfo(
            "actor_died", f"the actor {actor.actor_id} died: {cause}", function_name=actor.actor_id
        )
        if actor.creation_sent:
            self.scheduler.give_back(actor.creation)
        was_alive, actor.state = actor.state, "DEAD"
        self.recorder.log(
            [Event(K.ACTOR, actor.actor_id, "dead", {"cause": cause[:2000]}, node_id=self.node_id)]
        )
        # direct calls wait for the worker's connection to end: an answer the caller may
        # have seen is recorded as it was, not as a failure
        connected = actor.worker is not None and self.worker_pool.alive(actor.worker.worker_id)
        still = {t: r for t, r in actor.running.items() if r.direct and connected}
        pending = [r for t, r in actor.running.items() if t not in still]
        pending += actor.queue
        actor.running, actor.queue = still, deque()
        if was_alive == "PENDING_CREATION" and actor.creation.spec.task_id in self.tasks:
            pending.append(actor.creation)
        for record in pending:
            self.node.finish_failed(record, actor.death, log_event=True)
        self._tell_watchers(actor)
        spec = actor.creation.spec
        for object_id in (*spec.dependencies(), *spec.contained_refs):
            self.objects.unpin(object_id)
        if actor.worker is not None:
            with contextlib.suppress(ProcessLookupError):
                actor.worker.process.kill()

    def kill(self, actor_id: str, no_restart: bool, cause: str = "") -> None:
        actor = self.actors.get(actor_id)
        if actor is None or actor.death is not None:
            return
        if actor.elsewhere:  # its node does it
            payload: dict[str, Any] = {"no_restart": no_restart}
            if cause:
                payload["cause"] = cause
            self.recorder.log(
                [Event(K.ACTOR, actor_id, "kill_requested", payload, node_id=self.node_id)]
            )
            return
        if no_restart and cause:
            self._died(actor, cause)
            return
        if no_restart:
            self._died(actor, "it was killed with kill()")
        elif actor.worker is not None:  # as a crash: restarted if max_restarts allows
            with contextlib.suppress(ProcessLookupError):
                actor.worker.process.kill()

    def _restart_or_die(
        self: Any, actor: ActorRecord, cause: str, begun: set[str] | None = None
    ) -> None:
        """After its process died: the actor is re-created (constructor re-run) if
        ``max_restarts`` allows, and the call it was running is sent again if
        ``max_task_retries`` allows; queued calls wait for the new instance."""
        limit = actor.options.max_restarts
        if limit != -1 and actor.restarts >= limit:
            self._died(actor, cause)
            return
        actor.restarts += 1
        if actor.creation_sent:
            self.scheduler.give_back(actor.creation)
        actor.creation_sent, actor.state = False, "RESTARTING"
        self.recorder.log(
            [
                Event(
                    K.ACTOR,
                    actor.actor_id,
                    "restarting",
                    {"attempt": actor.restarts},
                    node_id=self.node_id,
                )
            ]
        )
        interrupted, actor.running = list(actor.running.values()), {}
        # Which calls had begun: as the process marked them (``begun``). Without that
        # mark: only the first max_concurrency calls the daemon sent can have (the
        # worker runs calls in the order it gets them), and any sent straight to it.
        started = actor.options.max_concurrency
        sent_here = 0
        requeued = []
        for record in interrupted:
            if begun is not None:
                may_have_begun = record.spec.task_id in begun
            else:
                may_have_begun = record.direct or sent_here < started
            sent_here += not record.direct
            requeued.append((record, may_have_begun))
        for record, may_have_begun in reversed(requeued):  # to the queue's head, in order
            self._interrupted(actor, record, cause, begun=may_have_begun, at_head=True)
        actor.worker = self.worker_pool.start(actor_id=actor.actor_id)
        self._unscheduled.add(actor.actor_id)

    def _interrupted(
        self,
        actor: ActorRecord,
        record: TaskRecord,
        cause: str,
        *,
        begun: bool,
        at_head: bool = False,
    ) -> None:
        """A call the actor's dead process did not answer goes to the new instance
        (a new attempt; using up one of ``max_task_retries`` if it may have begun), or
        fails when it may have begun and no retries are left."""
        record.direct = record.answered = False
        if begun and record.retries_left == 0:
            self.node.finish_failed(
                record,
                p.ErrorInfo(
                    "actor_died",
                    f"the actor {actor.actor_id} died while running the call "
                    f"(max_task_retries=0): {cause}",
                    function_name=actor.actor_id,
                ),
                log_event=True,
            )
            return
        if begun:
            record.retries_left -= record.retries_left > 0
            reason = f"the actor restarted: {cause}"
        else:
            reason = f"the actor restarted before the call began: {cause}"
        self.tasks.next_attempt(record, reason)
        if at_head:
            actor.queue.appendleft(record)
        else:
            actor.queue.append(record)
        # A call sent straight to the worker never waited here for its arguments (its
        # caller resolved them): now it does, or the queue behind it would wait for ever
        # for arguments this node was never asked to bring (made on other nodes).
        deps = record.spec.dependencies()
        record.pending_deps = {d for d in deps if not self.objects.is_ready(d)}
        for dep in list(record.pending_deps):
            self.objects.on_ready(dep, functools.partial(self._dep_ready, actor, record, dep))

    def worker_lost(self, handle: WorkerHandle, exit_code: int) -> None:
        session_dir = str(self.session_dir)
        begun_path = begun_calls_path(session_dir, handle.worker_id)
        begun = read_begun(begun_path)
        for path in (begun_path, p.direct_socket_path(session_dir, handle.worker_id)):
            with contextlib.suppress(OSError):
                os.unlink(path)
        actor = self.actors.get(handle.actor_id or "")
        if actor is None or actor.worker is not handle:
            return
        actor.last_begun = (handle.worker_id, begun)
        if actor.death is None:
            cause = f"its worker process died (exit code {exit_code})"
            self._restart_or_die(actor, cause, begun)
            return
        # dead already: the direct calls it left unanswered fail now
        leftover, actor.running = list(actor.running.values()), {}
        for record in leftover:
            record.direct = record.answered = False
            self.node.finish_failed(record, actor.death, log_event=True)

    def owner_gone(self, conn: Connection) -> None:
        """Actors die with the process that created them, unless detached."""
        for actor in list(self.actors.values()):
            options = actor.creation.spec.actor_options
            if actor.owner is conn and not (options and options.detached):
                if actor.elsewhere:
                    self.kill(actor.actor_id, True, "its owner exited")
                else:
                    self._died(actor, "its owner exited")

    # -- actors made here that live on another node, and actors hosted here ----------

    def placed(self, creation: TaskRecord, node_id: str) -> None:
        """An actor made here was placed on ``node_id``: the calls that waited for it go
        there, in order."""
        actor = self.actors.get(creation.spec.actor_id or "")
        if actor is None or not actor.elsewhere:
            return
        actor.placed_on = node_id
        waiting, actor.queue = list(actor.queue), deque()
        for record in waiting:  # (queued here before it was known to live elsewhere)
            record.state = "SPILLED"
            self.node.remember_spilled(record)
            self._forward(actor, record)

    def node_lost(self, node_id: str) -> None:
        """The actors made here that lived on ``node_id`` are made again elsewhere, or die."""
        for actor in list(self.actors.values()):
            if actor.elsewhere and actor.placed_on == node_id and actor.death is None:
                self._lost_with_node(actor, node_id)

    def creation_placed_on_dead_node(self, creation: TaskRecord, node_id: str) -> None:
        actor = self.actors.get(creation.spec.actor_id or "")
        if actor is not None and actor.elsewhere and actor.death is None:
            self._lost_with_node(actor, node_id)

    def _lost_with_node(self, actor: ActorRecord, node_id: str) -> None:
        """An actor made here lived on a node that died: it is made again on another
        node if ``max_restarts`` allows (its constructor re-run; ``restarting`` says
        so), and the calls forwarded to it and not finished are sent to the new
        instance, in their order, as ``max_task_retries`` allows (each may have begun
        there: it counts as a retry); otherwise it is dead and they fail."""
        cause = f"its node {node_id} died"
        calls = self.node.spilled_calls_of(actor.actor_id)
        for record in calls:
            self.node.forget_spilled(record.spec.task_id)
        creation = actor.creation
        self.node.forget_spilled(creation.spec.task_id)
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
            record.retries_left -= record.retries_left > 0
            self.tasks.next_attempt(record, f"the actor restarted: {cause}")
            resent.append(record)
        actor.queue.extendleft(reversed(resent))  # before calls made since, in order
        for record in resent:
            self.node.remember_spilled(record)  # forwarded again once placed
        # placed again (a new attempt: a new placement), its calls forwarded once it is
        self.tasks.keep(creation)  # its constructor may have finished: in hand again
        creation.placed_on = None
        self.tasks.next_attempt(creation, f"the actor restarts: {cause}")
        self.node.spill(creation)

    def _forward(self, actor: ActorRecord, record: TaskRecord) -> None:
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

    def host(self, creation: TaskRecord, owner_address: str) -> None:
        """An actor made on another node (at ``owner_address``) lives here."""
        assert creation.spec.actor_id is not None  # an actor's creation task
        actor = ActorRecord(creation.spec.actor_id, creation, None)
        self.actors[actor.actor_id] = actor
        self._unscheduled.add(actor.actor_id)
        # the constructor's arguments stay here while the actor lives (a restart runs
        # the constructor again), as on a creator's node
        for object_id in (*creation.spec.dependencies(), *creation.spec.contained_refs):
            self.objects.pin(object_id)
        self.node.pull_then(creation, owner_address, lambda: self._dispatch(actor))
        actor.worker = self.worker_pool.start(actor_id=actor.actor_id)

    def remote_event(self, event: RecordedEvent) -> None:
        """Another node's event of an actor known here: a kill asked of an actor
        hosted here, or the state of an actor made here that lives there."""
        actor = self.actors.get(event.entity_id)
        if actor is None:
            return
        if event.event_type == "kill_requested" and actor.owner is None:
            cause = event.payload.get("cause") or ""
            self.kill(actor.actor_id, bool(event.payload["no_restart"]), cause)
        elif actor.elsewhere and event.event_type in ("alive", "restarting"):
            actor.state = "ALIVE" if event.event_type == "alive" else "RESTARTING"
        elif actor.elsewhere and event.event_type == "dead":
            actor.state = "DEAD"
            actor.death = p.ErrorInfo(
                "actor_died",
                f"the actor {actor.actor_id} died: {event.payload.get('cause', '')}",
                function_name=actor.actor_id,
            )
            self.names.forget(actor.actor_id)
