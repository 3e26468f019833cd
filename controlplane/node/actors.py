"""Actors on a node: each lives in a dedicated worker process, started for it; its
method calls are sent there in the order the daemon received them (so each caller's
calls run in its submission order), up to max_concurrency running at once and
_PIPELINE_DEPTH more sent ahead. The life of every actor is in the log:
``creation_requested``, ``scheduled``, ``alive`` (with its worker), ``dead`` (cause).

``ActorDirector`` owns the actors that live on this node, made here or hosted here for
another node; what it asks of the node (a call's end, a worker to run on) goes through
``ActorHost``. An actor made here that will live on another node is handed to
``ActorsElsewhere`` (actors_elsewhere.py), which owns it from then on.

Direct calls (controlplane/README.md, "Direct actor calls"; actor_routes.py). A caller
on this node that has an alive actor's route sends each call straight to the actor's
worker, and the same message to the daemon (SubmitDirectCall), which records it as
sent (``submitted``, ``running``) without sending it on; the worker tells the daemon
the outcome before it answers the caller, whose ``finished`` is written behind. A call
the worker did not answer (its process died, exit_actor()) is settled here, durably,
before its caller hears.
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
from controlplane.node.actor_replay import calls_to_replay, internal_call, internal_call_done
from controlplane.node.actor_routes import ActorRoutes
from controlplane.node.actors_borrowed import BorrowedActors
from controlplane.node.actors_elsewhere import ActorsElsewhere, call_retries
from controlplane.node.local_scheduler import LocalScheduler
from controlplane.node.placement_groups import PlacementGroups
from controlplane.node.recorder import EventRecorder
from controlplane.node.runtime_envs import RuntimeEnvs, env_key
from controlplane.node.spilled_tasks import SpilledTasks
from controlplane.node.task_table import Connection, TaskRecord, TaskTable, to_owner
from controlplane.node.workers import WorkerHandle, WorkerPool
from dataplane import protocol as p
from dataplane.begun_calls import begun_calls_path, read_begun
from dataplane.object_table import ObjectTable
from dataplane.store_memory import StoreMemory

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
    worker: WorkerHandle | None = None
    creation_sent: bool = False
    reported_infeasible: bool = False
    queue: deque[TaskRecord] = field(default_factory=deque)
    running: dict[str, TaskRecord] = field(default_factory=dict)  # task id -> call
    death: p.ErrorInfo | None = None
    restarts: int = 0
    replaying: bool = False  # its earlier calls are being read from the log
    calls_since_checkpoint: int = 0
    # the last dead worker's id and the calls it had begun and not answered (None: not
    # known), for direct calls whose copies come after its death
    last_begun: tuple[str, set[str] | None] = ("", None)

    @property
    def options(self) -> p.ActorOptions:
        return self.creation.spec.actor_options or p.ActorOptions("", {})


def _retried_on_error(record: TaskRecord, done: p.TaskDone) -> bool:
    """Whether a call that raised runs again (retry_exceptions, while retries last)."""
    error = done.error
    return (
        error is not None
        and error.kind == "task_error"
        and record.spec.retry_exceptions
        and error.retryable
        and record.retries_left != 0
        and not done.direct  # (its caller has the answer: such calls go via the daemon)
    )


class ActorHost(Protocol):
    """What the actors ask of the node: a call's end (``finish_ok``/``finish_failed``,
    which publish its results) and sending work to a worker."""

    def finish_ok(self, record: TaskRecord, returns: list[p.ObjectLocation]) -> None: ...

    def finish_failed(
        self,
        record: TaskRecord,
        error: p.ErrorInfo,
        *,
        log_event: bool,
        made: list[p.ObjectLocation] | None = None,
    ) -> None: ...

    def failed_dependency(self, record: TaskRecord) -> p.ErrorInfo | None: ...

    def run(self, record: TaskRecord, handle: WorkerHandle) -> None: ...

    def running_event(self, record: TaskRecord, worker_id: str) -> Event: ...


class ActorDirector:
    """Owns the actors living on this node (``ActorRecord``: state, worker, queued
    and running calls, restarts), made here or hosted here for another node."""

    def __init__(
        self,
        node_id: str,
        gcs_url: str,
        session_dir: Path,
        recorder: EventRecorder,
        objects: ObjectTable,
        memory: StoreMemory,
        tasks: TaskTable,
        scheduler: LocalScheduler,
        worker_pool: WorkerPool,
        placement_groups: PlacementGroups,
        spills: SpilledTasks,
        elsewhere: ActorsElsewhere,
        names: ActorNames,
        node: ActorHost,
        envs: RuntimeEnvs,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        borrowed: BorrowedActors | None = None,
    ) -> None:
        """``borrowed``: a cluster's node calls actors other nodes made (None: a
        private cluster's, where every actor is made here)."""
        self.node_id = node_id
        self.gcs_url = gcs_url
        self.session_dir = session_dir
        self.recorder = recorder
        self.objects = objects
        self.memory = memory
        self.tasks = tasks
        self.scheduler = scheduler
        self.worker_pool = worker_pool
        self.placement_groups = placement_groups
        self.spills = spills
        self.elsewhere = elsewhere
        self.borrowed = borrowed
        self.names = names
        self.node = node
        self._spawn = spawn
        self.actors: dict[str, ActorRecord] = {}
        self._unscheduled: set[str] = set()  # created, constructor not sent yet
        self.routes = ActorRoutes(session_dir)
        self.envs = envs
        self._env_waiting: set[str] = set()  # actors whose runtime_env is being set up

    def _log(self, actor_id: str, event_type: str, payload: dict[str, Any], **more: Any) -> None:
        """Logs an event of the actor (written behind); one hosted here for another node
        is addressed to that node (``owner_node``), which follows it from the log."""
        actor = self.actors.get(actor_id)
        if actor is not None:
            more.setdefault("job_id", actor.creation.spec.job_id)
            if actor.creation.placed_from is not None:
                payload = {**payload, **to_owner(actor.creation)}
        event = Event(K.ACTOR, actor_id, event_type, payload, node_id=self.node_id, **more)
        self.recorder.log([event])

    def alive(self) -> int:
        """The node's actors alive, those living elsewhere included."""
        return sum(1 for a in self.actors.values() if a.death is None) + self.elsewhere.alive()

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
        options = spec.actor_options
        self.names.created(spec.actor_id, options)
        payload: dict[str, Any] = {"class_name": spec.name.removesuffix(".__init__")}
        if options is not None:  # (its namespace: the one its name is in, or its job's)
            payload["namespace"] = self.names.namespace(options.namespace, spec.job_id)
            payload["detached"] = options.detached
            if options.name is not None:
                payload["name"] = options.name
        self._log(spec.actor_id, "creation_requested", payload, job_id=spec.job_id)
        # the constructor's arguments stay pinned while the actor lives: a restart
        # runs the constructor again
        for object_id in (*spec.dependencies(), *spec.contained_refs):
            self.objects.pin(object_id)
        if self.spills.actor_goes_elsewhere(creation):  # placed by the global schedulers
            self.elsewhere.take(creation, conn)
            return
        actor = ActorRecord(spec.actor_id, creation, conn)
        self.actors[actor.actor_id] = actor
        self._unscheduled.add(actor.actor_id)
        self._start_worker(actor)
        for dep in list(creation.pending_deps):
            self.objects.on_ready(dep, functools.partial(self._dep_ready, actor, creation, dep))

    def _start_worker(self, actor: ActorRecord) -> None:
        """Starts the actor's process, in its runtime_env once that is set up here
        (``envs_changed``); an env that cannot be set up is the actor's death."""
        actor.worker = None
        runtime_env = getattr(actor.creation.spec, "runtime_env", None)  # (older specs)
        launch = None
        if runtime_env and env_key(runtime_env) is not None:
            ready = self.envs.launch_for(runtime_env, actor.owner)
            if ready is None:
                self._env_waiting.add(actor.actor_id)
                return
            if isinstance(ready, str):
                self._died(actor, f"RuntimeEnvSetupError: {ready}")
                return
            launch = ready
        actor.worker = self.worker_pool.start(actor_id=actor.actor_id, launch=launch)

    def envs_changed(self) -> None:
        """A runtime_env's setup ended: the actors that waited for it start (or die)."""
        waiting, self._env_waiting = self._env_waiting, set()
        for actor_id in waiting:
            actor = self.actors.get(actor_id)
            if actor is not None and actor.death is None and actor.worker is None:
                self._start_worker(actor)

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
        it is handed, with its calls so far, to the actors living elsewhere."""
        del self.actors[actor.actor_id]
        self._unscheduled.discard(actor.actor_id)
        self.routes.tell(None, actor.actor_id)
        handle, actor.worker = actor.worker, None
        if handle is not None:
            with contextlib.suppress(ProcessLookupError):
                handle.process.kill()
        calls, actor.queue = actor.queue, deque()
        self.elsewhere.take(actor.creation, actor.owner, restarts=actor.restarts, calls=calls)

    def call(self, record: TaskRecord) -> None:
        if record.spec.actor_id in self.elsewhere:
            self.elsewhere.call(record)
            return
        actor = self.actors.get(record.spec.actor_id or "")
        if actor is None and self.borrowed is not None:  # made through another node
            self.borrowed.call(record)
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
        record.retries_left = call_retries(record.spec, actor.options)
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
            elif missing := self.spills.labels_missing(creation.spec):
                self._report_infeasible(actor, missing)
                return  # (no other node to go to: it waits, as Ray's)
            elif not self.scheduler.resources.available_for(creation.spec.resources):
                if self.spills.actor_goes_elsewhere(creation):  # (a node joined since)
                    self._move_elsewhere(actor)
                elif not self.scheduler.resources.fits_total(creation.spec.resources):
                    self._report_infeasible(actor)
                return  # tried again whenever resources are released
            self.scheduler.take(creation, bundle)
            actor.creation_sent = True
            self._unscheduled.discard(actor.actor_id)
            self._log(actor.actor_id, "scheduled", {})
            self.node.run(creation, handle)
            return
        if actor.replaying:
            return  # its earlier calls go first, once read from the log
        at_once = p.calls_at_once(actor.options)
        limit = at_once + _PIPELINE_DEPTH
        # Ray's ordering: an actor that runs one call at a time runs each caller's calls
        # in the order that caller sent them, so a call waits for the arguments of its
        # caller's calls before it (not for other callers'); a threaded or async one
        # runs each call once its own arguments are here
        held: list[TaskRecord] = []
        waiting_callers: set[int] = set()
        while len(actor.running) < limit and actor.queue:
            record = actor.queue[0]
            caller = id(record.submitter)
            if record.pending_deps or (at_once == 1 and caller in waiting_callers):
                if at_once == 1:
                    waiting_callers.add(caller)
                held.append(actor.queue.popleft())
                continue
            record = actor.queue.popleft()
            failed = self.node.failed_dependency(record)
            if failed is not None:
                self.node.finish_failed(record, failed, log_event=True)
                continue
            actor.running[record.spec.task_id] = record
            self.node.run(record, handle)
        actor.queue.extendleft(reversed(held))

    def _report_infeasible(self, actor: ActorRecord, reason: str | None = None) -> None:
        """Once: the actor needs more than this node has (``reason``: something else it
        lacks) and no other node can be asked, so it waits; a warning and an
        ``infeasible`` event say so."""
        if actor.reported_infeasible:
            return
        actor.reported_infeasible = True
        request = actor.creation.spec.resources
        reason = reason or f"it needs {request} and this node has {self.scheduler.resources.total}"
        log.warning("actor %s cannot be scheduled: %s", actor.actor_id, reason)
        if actor.owner is not None:
            actor.owner.send(p.Notice(f"actor {actor.actor_id} cannot be scheduled now: {reason}"))
        self._log(actor.actor_id, "infeasible", {"reason": reason, "resources": request})

    def _task_done(self, actor: ActorRecord, done: p.TaskDone) -> None:
        if done.task_id == actor.creation.spec.task_id:
            creation = actor.creation
            if done.error is not None:
                trace = f"\n{done.error.traceback}" if done.error.traceback else ""
                self._died(actor, f"the actor's constructor raised {done.error.message}{trace}")
                return
            first_start, actor.state = actor.state == "PENDING_CREATION", "ALIVE"
            assert actor.worker is not None
            self._log(actor.actor_id, "alive", {"worker_id": actor.worker.worker_id})
            if first_start:
                self.node.finish_ok(creation, [])
            if actor.options.replay_calls_on_restart and (not first_start or creation.attempt > 0):
                actor.replaying = True
                self._spawn(self._replay_calls(actor))
            self.routes.tell(actor, actor.actor_id)
        else:
            record = actor.running.pop(done.task_id, None)
            if record is None:
                if done.direct:  # its caller's copy of the call is still on its way
                    self.routes.answered_early(done)
                return
            exiting = done.error is not None and done.error.kind == "actor_exit"
            record.answered = done.direct and not exiting
            if record.internal is not None:
                if checkpoint := internal_call_done(actor, record, done, self.memory):
                    self._log(actor.actor_id, "checkpointed", checkpoint[0], data=checkpoint[1])
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
            if done.error is not None and _retried_on_error(record, done):
                self.tasks.retry_attempt(record, f"the call raised {done.error.message}")
                actor.queue.appendleft(record)  # (ahead of the calls sent after it)
            elif done.error is not None:
                self.node.finish_failed(record, done.error, log_event=True, made=done.returns)
            else:
                record.output_digest = done.output_digest
                self.node.finish_ok(record, done.returns)
        self._dispatch(actor)

    # -- direct calls (controlplane/README.md, "Direct actor calls") -----------------

    def watch(self, conn: Connection, actor_id: str) -> None:
        self.routes.watch(conn, self.actors.get(actor_id), actor_id)

    def submit_direct(self, conn: Connection, call: p.SubmitDirectCall) -> None:
        """The daemon's copy of a call sent straight to the worker ``worker_id``: from
        here on it is in the actor's ``running`` calls as if the daemon had sent it, so
        the worker's answer, its death or the actor's settles it like any other."""
        spec, worker_id = call.spec, call.worker_id
        record = self.tasks.submit(conn, spec, direct=True, data=call.frame)
        actor = self.actors.get(spec.actor_id or "")
        record.retries_left = call_retries(spec, actor.options) if actor is not None else 0
        handle = actor.worker if actor is not None else None
        early = self.routes.take_early(spec.task_id)
        gone = handle is None or handle.worker_id != worker_id
        # a dead actor's worker whose end was already handled (worker_lost) answers nothing
        gone = gone or (
            actor is not None and actor.death is not None and not self.worker_pool.alive(worker_id)
        )
        if actor is None or (early is None and gone):
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
        self._log(actor.actor_id, "replaying", payload)
        actor.queue.extendleft(reversed(replayed))
        actor.replaying = False
        self._dispatch(actor)

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
        self._log(actor.actor_id, "dead", {"cause": cause[:2000]})
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
        self.routes.tell(actor, actor.actor_id)
        spec = actor.creation.spec
        for object_id in (*spec.dependencies(), *spec.contained_refs):
            self.objects.unpin(object_id)
        if actor.worker is not None:
            with contextlib.suppress(ProcessLookupError):
                actor.worker.process.kill()

    def worker_of(self, actor_id: str) -> WorkerHandle | None:
        """The worker of an actor of this node (None: not of this node, or none now)."""
        actor = self.actors.get(actor_id)
        return actor.worker if actor is not None else None

    def restarts(self, actor_id: str | None) -> int:
        """How often the actor restarted (0 for one not of this node)."""
        actor = self.actors.get(actor_id or "")
        return actor.restarts if actor is not None else 0

    def cancel_call(self, record: TaskRecord) -> bool:
        """Cancels a call of an actor of this node, Ray's way: one still queued here is
        dropped (``cancelled``); one sent to the worker is the worker's to cancel
        (``CancelCall``: dropped if it has not begun, cancelled as a coroutine in an
        async actor, left to run in a sync or threaded one). False if the call is not
        one of this node's actors'."""
        if record.spec.actor_id in self.elsewhere:
            self.elsewhere.cancel_call(record)
            return True
        actor = self.actors.get(record.spec.actor_id or "")
        if actor is None or actor.death is not None:
            return False
        if record in actor.queue:
            actor.queue.remove(record)
            self.node.finish_failed(record, p.ErrorInfo.cancelled(record.spec.name), log_event=True)
        elif record.spec.task_id in actor.running and actor.worker and actor.worker.conn:
            actor.worker.conn.send(p.CancelCall(record.spec.task_id))
        return True

    def kill(self, actor_id: str, no_restart: bool, cause: str = "") -> None:
        if actor_id in self.elsewhere:  # its node does it
            self.elsewhere.kill(actor_id, no_restart, cause)
            return
        actor = self.actors.get(actor_id)
        if actor is None and self.borrowed is not None:  # made through another node
            self.borrowed.kill(actor_id, no_restart)
            return
        if actor is None or actor.death is not None:
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
        self._log(actor.actor_id, "restarting", {"attempt": actor.restarts})
        interrupted, actor.running = list(actor.running.values()), {}
        # Which calls had begun: as the process marked them (``begun``). Without that
        # mark: only the first max_concurrency calls the daemon sent can have (the
        # worker runs calls in the order it gets them), and any sent straight to it.
        started = p.calls_at_once(actor.options)
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
        self._start_worker(actor)
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
            # as Ray: the actor lives on (it restarts), so the call's error says it is
            # unavailable rather than dead
            self.node.finish_failed(
                record,
                p.ErrorInfo(
                    "actor_unavailable",
                    f"the actor {actor.actor_id} restarts: its process died while running "
                    f"the call, which has no retries left (max_task_retries): {cause}",
                    function_name=actor.actor_id,
                ),
                log_event=True,
            )
            return
        if begun:
            self.tasks.retry_attempt(record, f"the actor restarted: {cause}")
        else:
            self.tasks.next_attempt(record, f"the actor restarted before the call began: {cause}")
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
        self.elsewhere.owner_gone(conn)
        for actor in list(self.actors.values()):
            options = actor.creation.spec.actor_options
            if actor.owner is conn and not (options and options.detached):
                self._died(actor, "its owner exited")

    # -- actors hosted here for another node ----------------------------------------

    def host(self, creation: TaskRecord) -> None:
        """An actor made on another node lives here; its constructor is sent once its
        arguments are here (``arguments_here``)."""
        assert creation.spec.actor_id is not None  # an actor's creation task
        actor = ActorRecord(creation.spec.actor_id, creation, None)
        self.actors[actor.actor_id] = actor
        self._unscheduled.add(actor.actor_id)
        # the constructor's arguments stay here while the actor lives (a restart runs
        # the constructor again), as on a creator's node
        for object_id in (*creation.spec.dependencies(), *creation.spec.contained_refs):
            self.objects.pin(object_id)
        self._start_worker(actor)

    def arguments_here(self, actor_id: str) -> None:
        """A hosted actor's constructor arguments were brought here from its creator's node."""
        actor = self.actors.get(actor_id)
        if actor is not None:
            self._dispatch(actor)

    def remote_event(self, event: RecordedEvent) -> None:
        """Another node's event of an actor hosted here: its creator's node, or a node
        that calls it (actors_borrowed.py), asks for a kill."""
        actor = self.actors.get(event.entity_id)
        if actor is not None and event.event_type == "kill_requested":
            cause = event.payload.get("cause") or ""
            self.kill(actor.actor_id, bool(event.payload["no_restart"]), cause)
