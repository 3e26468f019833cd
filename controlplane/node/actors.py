"""Actors on a node: each lives in a dedicated worker process, started for it; its
method calls are sent there in the order the daemon received them (so each caller's
calls run in its submission order), up to max_concurrency running at once and
_PIPELINE_DEPTH more sent ahead. The life of every actor is in the log:
``creation_requested``, ``scheduled``, ``alive`` (with its worker), ``dead`` (cause).

A mixin of NodeDaemon: it uses the daemon's task, object and worker bookkeeping.

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
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controlplane.eventlog import EntityKind, Event
from controlplane.node.actor_replay import calls_to_replay, drop_returns, internal_call
from controlplane.node.task_table import Connection, TaskRecord
from dataplane import protocol as p
from dataplane.begun_calls import begun_calls_path, read_begun

if TYPE_CHECKING:
    from controlplane.node.workers import WorkerHandle

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


class ActorsMixin:
    actors: dict[str, ActorRecord]
    unscheduled_actors: set[str]  # created, constructor not sent yet
    # a direct call's TaskDone that came before the caller's copy of the call
    early_direct_done: dict[str, p.TaskDone]

    # -- creation ------------------------------------------------------------------

    def _create_actor(self: Any, conn: Connection, creation: TaskRecord) -> None:
        spec = creation.spec
        assert spec.actor_id is not None  # an actor's creation task
        actor = ActorRecord(spec.actor_id, creation, conn)
        self.actors[actor.actor_id] = actor
        self.unscheduled_actors.add(actor.actor_id)
        options = spec.actor_options
        payload: dict[str, Any] = {"class_name": spec.name.removesuffix(".__init__")}
        if options is not None and options.name is not None:
            payload["name"] = options.name
            payload["namespace"] = self.actor_names.namespace(options.namespace, spec.job_id)
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
        if self._actor_goes_elsewhere(creation):  # placed by the global schedulers
            actor.elsewhere = True
            self.unscheduled_actors.discard(actor.actor_id)
            self._when_deps_ready(creation, lambda: self.spill(creation))
            return
        actor.worker = self.worker_pool.start(actor_id=actor.actor_id)
        for dep in list(creation.pending_deps):
            self.objects.on_ready(dep, lambda d=dep: self._actor_dep_ready(actor, creation, d))

    def _actor_dep_ready(self: Any, actor: ActorRecord, record: TaskRecord, dep: str) -> None:
        record.pending_deps.discard(dep)
        self._actor_dispatch(actor)

    def _actor_worker_connected(self: Any, handle: WorkerHandle) -> None:
        actor = self.actors.get(handle.actor_id)
        if actor is not None:
            self._actor_dispatch(actor)

    # -- calls ---------------------------------------------------------------------

    def _move_actor_elsewhere(self: Any, actor: ActorRecord) -> None:
        """The actor will live on another node: its worker here goes (not a crash), and
        its creation is spilled to be placed there."""
        actor.elsewhere = True
        self.unscheduled_actors.discard(actor.actor_id)
        self._tell_watchers(actor)
        handle, actor.worker = actor.worker, None
        if handle is not None:
            with contextlib.suppress(ProcessLookupError):
                handle.process.kill()
        self._when_deps_ready(actor.creation, lambda: self.spill(actor.creation))

    def _when_deps_ready(self: Any, record: TaskRecord, then: Any) -> None:
        if not record.pending_deps:
            then()
            return
        for dep in list(record.pending_deps):

            def ready(d: str = dep) -> None:
                record.pending_deps.discard(d)
                if not record.pending_deps:
                    then()

            self.objects.on_ready(dep, ready)

    def _actor_call(self: Any, record: TaskRecord) -> None:
        actor = self.actors.get(record.spec.actor_id)
        if actor is not None and actor.elsewhere and actor.death is None:
            # its node runs it, in the order of the log; the result comes back as a
            # spilled task's does. Calls wait here until the actor is placed.
            record.state = "SPILLED"
            record.retries_left = actor.options.max_task_retries
            self.spilled[record.spec.task_id] = record
            if actor.placed_on is None:
                actor.queue.append(record)
            else:
                self._forward_call(actor, record)
            return
        if actor is None:
            self._finish_failed(
                record,
                p.ErrorInfo("actor_died", f"no actor {record.spec.actor_id} on this node"),
                log_event=True,
            )
            return
        if actor.death is not None:
            self._finish_failed(record, actor.death, log_event=True)
            return
        record.retries_left = actor.options.max_task_retries
        actor.queue.append(record)
        for dep in list(record.pending_deps):
            self.objects.on_ready(dep, lambda d=dep: self._actor_dep_ready(actor, record, d))
        self._actor_dispatch(actor)

    def _actor_dispatch(self: Any, actor: ActorRecord) -> None:
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
                    self._move_actor_elsewhere(actor)
                    return
                bundle, never = self.placement_groups.bundle_for(creation)
                if never is not None:
                    self._actor_died(actor, f"it cannot be scheduled: {never}")
                    return
                if bundle is None:
                    return  # tried again whenever the group is ready or frees resources
            elif not self.resources.available_for(creation.spec.resources):
                if not self.resources.fits_total(creation.spec.resources):
                    self._report_infeasible_actor(actor)
                return  # tried again whenever resources are released
            self.scheduler.take(creation, bundle)
            actor.creation_sent = True
            self.unscheduled_actors.discard(actor.actor_id)
            self.recorder.log(
                [Event(K.ACTOR, actor.actor_id, "scheduled", {}, node_id=self.node_id)]
            )
            self.run(creation, handle)
            return
        if actor.replaying:
            return  # its earlier calls go first, once read from the log
        limit = actor.options.max_concurrency + _PIPELINE_DEPTH
        while len(actor.running) < limit and actor.queue and not actor.queue[0].pending_deps:
            record = actor.queue.popleft()
            failed = self._failed_dependency(record)
            if failed is not None:
                self._finish_failed(record, failed, log_event=True)
                continue
            actor.running[record.spec.task_id] = record
            self.run(record, handle)

    def _report_infeasible_actor(self: Any, actor: ActorRecord) -> None:
        """Once: the actor needs more than this node has, so it waits (actors are not
        placed on other nodes yet); a warning and an ``infeasible`` event say so."""
        if actor.reported_infeasible:
            return
        actor.reported_infeasible = True
        request = actor.creation.spec.resources
        reason = (
            f"it needs {request} and this node has {self.resources.total}; actors run on "
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

    def _actor_task_done(self: Any, actor: ActorRecord, done: p.TaskDone) -> None:
        if done.task_id == actor.creation.spec.task_id:
            creation = actor.creation
            if done.error is not None:
                trace = f"\n{done.error.traceback}" if done.error.traceback else ""
                self._actor_died(
                    actor, f"the actor's constructor raised {done.error.message}{trace}"
                )
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
                self._finish_ok(creation, [])
            if actor.options.replay_calls_on_restart and (not first_start or creation.attempt > 0):
                actor.replaying = True
                self._spawn(self._replay_calls(actor))
            self._tell_watchers(actor)
        else:
            record = actor.running.pop(done.task_id, None)
            if record is None:
                if done.direct:  # its caller's copy of the call is still on its way
                    self.early_direct_done[done.task_id] = done
                return
            exiting = done.error is not None and done.error.kind == "actor_exit"
            record.answered = done.direct and not exiting
            if record.internal is not None:
                self._internal_call_done(actor, record, done)
                self._actor_dispatch(actor)
                return
            interval = actor.options.checkpoint_interval
            actor.calls_since_checkpoint += 1
            if interval and actor.calls_since_checkpoint >= interval:
                actor.calls_since_checkpoint = 0
                save = internal_call(actor, "__cairn_save__", [])
                actor.queue.appendleft(TaskRecord(save, None, attempt=-1, internal="checkpoint"))
            if done.error is not None and done.error.kind == "actor_exit":
                self._actor_died(actor, "the actor exited (exit_actor() was called)")
                self._finish_failed(record, actor.death, log_event=True)
                return
            if done.error is not None:
                self._finish_failed(record, done.error, log_event=True)
            else:
                record.output_digest = done.output_digest
                self._finish_ok(record, done.returns)
        self._actor_dispatch(actor)

    # -- direct calls (see the module's docstring) ------------------------------------

    def _watch_actor(self: Any, conn: Connection, actor_id: str) -> None:
        actor = self.actors.get(actor_id)
        if actor is not None and self._may_call_directly(actor) and actor.state != "ALIVE":
            actor.watchers.append(conn)  # answered once it is alive (or never will be)
        else:
            conn.send(self._route_of(actor, actor_id))

    def _may_call_directly(self: Any, actor: ActorRecord) -> bool:
        return not (
            actor.elsewhere or actor.death is not None or actor.options.replay_calls_on_restart
        )

    def _route_of(self: Any, actor: ActorRecord | None, actor_id: str) -> p.ActorRoute:
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

    def _tell_watchers(self: Any, actor: ActorRecord) -> None:
        """Callers waiting for the actor's route get it, now that it is alive, moved to
        another node or dead."""
        watchers, actor.watchers = actor.watchers, []
        route = self._route_of(actor, actor.actor_id)
        for conn in watchers:
            conn.send(route)

    def _submit_direct(self: Any, conn: Connection, call: p.SubmitDirectCall) -> None:
        """The daemon's copy of a call sent straight to the worker ``worker_id``: from
        here on it is in the actor's ``running`` calls as if the daemon had sent it, so
        the worker's answer, its death or the actor's settles it like any other."""
        spec, worker_id = call.spec, call.worker_id
        record = self.tasks.submit(conn, spec, direct=True, data=call.frame)
        actor = self.actors.get(spec.actor_id or "")
        record.retries_left = actor.options.max_task_retries if actor is not None else 0
        handle = actor.worker if actor is not None else None
        early = self.early_direct_done.pop(spec.task_id, None)
        if actor is None or (early is None and (handle is None or handle.worker_id != worker_id)):
            self._direct_call_unanswered(actor, record, worker_id)
            return
        record.state, record.worker = "RUNNING", handle
        self.recorder.log([self._running_event(record, worker_id)])
        actor.running[spec.task_id] = record
        if early is not None:
            self._actor_task_done(actor, early)

    def _direct_call_unanswered(
        self: Any, actor: ActorRecord | None, record: TaskRecord, worker_id: str
    ) -> None:
        """The worker the call was sent to died without answering it: the call fails
        with the actor's death, or goes to the new instance as interrupted calls do."""
        record.direct = False
        if actor is None or actor.death is not None:
            error = actor.death if actor is not None else None
            self._finish_failed(
                record,
                error or p.ErrorInfo("actor_died", f"no actor {record.spec.actor_id} on this node"),
                log_event=True,
            )
            return
        dead_worker, begun = actor.last_begun
        may_have_begun = dead_worker != worker_id or begun is None or record.spec.task_id in begun
        self._interrupted(actor, record, f"its worker {worker_id} died", begun=may_have_begun)
        self._actor_dispatch(actor)

    # -- replay ----------------------------------------------------------------------

    async def _replay_calls(self: Any, actor: ActorRecord) -> None:
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
        self._actor_dispatch(actor)

    def _internal_call_done(self: Any, actor: ActorRecord, record: Any, done: p.TaskDone) -> None:
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

    def _actor_died(self: Any, actor: ActorRecord, cause: str) -> None:
        """The actor is dead for good: its process goes, and every pending and later
        call fails with ActorDiedError carrying ``cause``."""
        if actor.death is not None:
            return
        self.unscheduled_actors.discard(actor.actor_id)
        self.actor_names.forget(actor.actor_id)
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
            self._finish_failed(record, actor.death, log_event=True)
        self._tell_watchers(actor)
        spec = actor.creation.spec
        for object_id in (*spec.dependencies(), *spec.contained_refs):
            self.objects.unpin(object_id)
        if actor.worker is not None:
            with contextlib.suppress(ProcessLookupError):
                actor.worker.process.kill()

    def _kill_actor(self: Any, actor_id: str, no_restart: bool, cause: str = "") -> None:
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
            self._actor_died(actor, cause)
            return
        if no_restart:
            self._actor_died(actor, "it was killed with kill()")
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
            self._actor_died(actor, cause)
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
        self.unscheduled_actors.add(actor.actor_id)

    def _interrupted(
        self: Any,
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
            self._finish_failed(
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
        self.next_attempt(record, reason)
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
            self.objects.on_ready(dep, lambda d=dep, r=record: self._actor_dep_ready(actor, r, d))

    def _actor_worker_lost(self: Any, handle: WorkerHandle, exit_code: int) -> None:
        session_dir = str(self.session_dir)
        begun_path = begun_calls_path(session_dir, handle.worker_id)
        begun = read_begun(begun_path)
        for path in (begun_path, p.direct_socket_path(session_dir, handle.worker_id)):
            with contextlib.suppress(OSError):
                os.unlink(path)
        actor = self.actors.get(handle.actor_id)
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
            self._finish_failed(record, actor.death, log_event=True)

    def _owner_gone(self: Any, conn: Connection) -> None:
        """Actors die with the process that created them, unless detached."""
        for actor in list(self.actors.values()):
            options = actor.creation.spec.actor_options
            if actor.owner is conn and not (options and options.detached):
                if actor.elsewhere:
                    self._kill_actor(actor.actor_id, True, "its owner exited")
                else:
                    self._actor_died(actor, "its owner exited")
