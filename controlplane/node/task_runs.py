"""A task's run on this node, from its submission to its end: it waits for its
arguments, is queued, sent to a worker (or spilled to another node), retried, and ends
finished, failed or cancelled, its results published through the object store once
its events are durable (see controlplane/node/daemon.py, "Durability before
visibility"). It keeps no state of its own -- the records are the task table's, the
queues and resources the local scheduler's -- and is what the other parts ask of the
node: the scheduler's ``Dispatcher``, the actors' ``ActorHost``, the remote tasks'
``TaskHost`` and the reconstructor's ``TaskRunner``."""

from __future__ import annotations

import contextlib
import functools
import signal
from typing import Any

from controlplane.eventlog import EntityKind, Event
from controlplane.node.actors import ActorDirector
from controlplane.node.local_scheduler import LocalScheduler
from controlplane.node.object_store import ObjectStore
from controlplane.node.placement_groups import PlacementGroups
from controlplane.node.reconstruction import Reconstructor
from controlplane.node.recorder import EventRecorder
from controlplane.node.remote_tasks import RemoteTasks
from controlplane.node.spilled_tasks import SpilledTasks
from controlplane.node.streams import Streams
from controlplane.node.task_table import Connection, TaskRecord, TaskTable, to_owner
from controlplane.node.workers import WorkerHandle, WorkerPool
from dataplane import protocol as p

K = EntityKind
_TRACEBACK_CHARS = 16_000  # of a failed task's traceback kept in its event (the end)


class TaskRuns:
    # the parts that ask this one back, given once they are made (``wire``)
    scheduler: LocalScheduler
    actor_director: ActorDirector
    remote_tasks: RemoteTasks
    reconstructor: Reconstructor

    def __init__(
        self,
        node_id: str,
        recorder: EventRecorder,
        store: ObjectStore,
        tasks: TaskTable,
        worker_pool: WorkerPool,
        placement_groups: PlacementGroups,
        spills: SpilledTasks,
    ) -> None:
        self.node_id = node_id
        self.recorder = recorder
        self.store = store
        self.streams = Streams(store)
        self.objects = store.objects
        self.tasks = tasks
        self.worker_pool = worker_pool
        self.placement_groups = placement_groups
        self.spills = spills
        self.ended = {"FINISHED": 0, "FAILED": 0}  # tasks and calls ended here (metrics)

    def wire(
        self,
        scheduler: LocalScheduler,
        actor_director: ActorDirector,
        remote_tasks: RemoteTasks,
        reconstructor: Reconstructor,
    ) -> None:
        self.scheduler = scheduler
        self.actor_director = actor_director
        self.remote_tasks = remote_tasks
        self.streams.remote = remote_tasks
        self.reconstructor = reconstructor

    def submit(self, conn: Connection, spec: p.TaskSpec) -> None:
        record = self.tasks.submit(conn, spec)
        if spec.actor_id is not None:
            if spec.method == "__init__":
                self.actor_director.create(conn, record)
            else:
                self.actor_director.call(record)
        elif record.pending_deps:
            record.state = "WAITING_FOR_DEPENDENCIES"
            self.recorder.log(
                [
                    Event(
                        K.TASK,
                        spec.task_id,
                        "waiting_for_dependencies",
                        {"dependencies": sorted(record.pending_deps)},
                        job_id=spec.job_id,
                    )
                ]
            )
            for dep in list(record.pending_deps):
                self.objects.on_ready(dep, functools.partial(self._dep_done, record, dep))
        else:
            self.enqueue(record)

    # (what the reconstructor asks of the node's tasks: reconstruction.TaskRunner)

    def has_task(self, task_id: str) -> bool:
        return task_id in self.tasks

    def knows_function(self, function_id: str) -> bool:
        return self.tasks.knows_function(function_id)

    def add_rebuild(self, spec: p.TaskSpec, attempt: int) -> TaskRecord:
        return self.tasks.add_rebuild(spec, attempt)

    def run_when_ready(self, record: TaskRecord) -> None:
        if not record.pending_deps:
            self.enqueue(record)
            return
        record.state = "WAITING_FOR_DEPENDENCIES"
        for dep in list(record.pending_deps):
            self.objects.on_ready(dep, functools.partial(self._dep_done, record, dep))

    def _dep_done(self, record: TaskRecord, object_id: str) -> None:
        record.pending_deps.discard(object_id)
        if not record.pending_deps and record.state == "WAITING_FOR_DEPENDENCIES":
            self.enqueue(record)

    def failed_dependency(self, record: TaskRecord) -> p.ErrorInfo | None:
        """The error of the first argument that stands for an error, if any."""
        for object_id in record.spec.dependencies():
            error = self.objects.location(object_id).error
            if error is not None:
                return error
        return None

    def enqueue(self, record: TaskRecord) -> None:
        failed = self.failed_dependency(record)
        if failed is not None:  # an upstream task failed: so does this one, with its error
            self.finish_failed(record, failed, log_event=True)
            return
        unschedulable = self.spills.unschedulable_here(record)
        if unschedulable is not None:
            error = p.ErrorInfo("unschedulable", unschedulable, record.spec.name)
            self.finish_failed(record, error, log_event=True)
            return
        self.scheduler.enqueue(record)

    def schedule(self) -> None:
        self.scheduler.schedule()

    # (what a pass of the scheduler asks of the node: local_scheduler.Dispatcher)

    def before_pass(self) -> None:
        self.placement_groups.reserve()
        self.actor_director.dispatch_waiting()

    def fail(self, record: TaskRecord, error: p.ErrorInfo) -> None:
        self.finish_failed(record, error, log_event=True)

    def infeasible(self, record: TaskRecord, reason: str) -> None:
        """The task waits, as in Ray (until cancelled, or until its node could ever
        run it): its ``infeasible`` event says why, and its submitter is told, once."""
        spec = record.spec
        self.recorder.log(
            [
                Event(
                    K.TASK,
                    spec.task_id,
                    "infeasible",
                    {
                        "resources": dict(spec.resources),
                        "reason": reason,
                        "attempt": record.attempt,
                    },
                    job_id=spec.job_id,
                    node_id=self.node_id,
                )
            ]
        )
        if record.submitter is not None:
            record.submitter.send(p.Notice(f"task {spec.name} cannot be scheduled now: {reason}"))

    def run(self, record: TaskRecord, handle: WorkerHandle) -> None:
        spec = record.spec
        record.state, record.worker = "RUNNING", handle
        blob = None
        if spec.function_id and self.worker_pool.first_use(handle, spec.function_id):
            blob = self.tasks.code_of(spec.function_id)
        args = [self.objects.location(a.ref) if a.ref else None for a in spec.args]
        kwargs = {k: self.objects.location(a.ref) for k, a in spec.kwargs.items() if a.ref}
        if record.internal is not None:
            pass  # logged as the actor's `replaying` / `checkpointed`, not as a call
        elif spec.actor_id is not None and spec.method != "__init__":
            # a method call: not scheduled, sent to the actor
            self.recorder.log([self.running_event(record, handle.worker_id)])
        else:  # scheduled and run in one commit: one event says both (issue 20, point 4)
            self.recorder.log([self.running_event(record, handle.worker_id, scheduled=True)])
        assert handle.conn is not None
        restarts = self.actor_director.restarts(spec.actor_id) if spec.method == "__init__" else 0
        handle.conn.send(
            p.ExecuteTask(spec, record.attempt, blob, args, kwargs, record.gpu_ids, restarts)
        )
        if spec.streaming:  # a retry: what its caller took already
            self._tell_consumed(record)

    def running_event(
        self, record: TaskRecord, worker_id: str, *, scheduled: bool = False
    ) -> Event:
        """``scheduled``: the event also stands for the task's scheduling (the views'
        and projections' ``scheduled_at``), which commits with it."""
        payload: dict[str, Any] = {
            "worker_id": worker_id,
            "attempt": record.attempt,
            # where the worker's output files stood: this attempt's lines start there
            **self.worker_pool.output.offsets(worker_id),
        }
        if scheduled:
            payload["scheduled"] = True
        return Event(
            K.TASK,
            record.spec.task_id,
            "running",
            payload,
            job_id=record.spec.job_id,
            node_id=self.node_id,
        )

    def task_done(self, handle: WorkerHandle | None, done: p.TaskDone) -> None:
        """A worker (``handle``; None: one this node no longer knows) finished a task."""
        if handle is not None and handle.actor_id is not None:
            self.actor_director.task_done(handle, done)
            return
        record = self.tasks.get(done.task_id)
        if handle is not None:
            ran = self.worker_pool.task_over(handle)
            if handle.blocked:
                self.scheduler.unblock(handle)
            if ran is not None:
                self.worker_pool.after_task(handle, ran.spec)
            else:
                self.worker_pool.idle_again(handle)
        if record is None or record.attempt != done.attempt:
            self.store.discard(done.returns)  # a stale attempt's: nobody will have them
            self.schedule()
            return
        self.scheduler.give_back(record)
        record.worker = None
        if done.error is not None:
            made = done.returns  # values a generator made before it failed, if any
            if record.force_cancel or record.cancelled:
                self.store.discard(made)
                self.finish_failed(record, p.ErrorInfo.cancelled(record.spec.name), log_event=True)
            elif (
                done.error.kind == "task_error"
                and record.spec.retry_exceptions
                and done.error.retryable
                and record.retries_left != 0
            ):
                self.store.discard(made)
                self.retry(record, done.error.message)
                return
            elif done.error.kind == "object_lost" and self.reconstructor.wait_for_lost_arguments(
                record, done.error.message
            ):
                self.schedule()
                return
            else:
                self.finish_failed(record, done.error, log_event=True, made=made)
        else:
            record.output_digest = done.output_digest
            self.finish_ok(record, done.returns)
        self.schedule()

    def stream_item(self, item: p.StreamItem) -> None:
        """A value a generator yielded (controlplane/node/streams.py)."""
        record = self.tasks.get(item.task_id)
        if record is None:  # over (a stale attempt's value): nobody will have it
            self.store.discard([item.location])
            return
        self.streams.item(record, item)

    def relay_stream_item(self, record: TaskRecord, location: p.ObjectLocation) -> bool:
        return self.streams.relayed(record, location)

    def end_relayed_stream(self, record: TaskRecord) -> None:
        """A generator this node spilled finished on another node (its values came)."""
        record.state = "FINISHED"
        self.streams.end(record, [], None)
        self.task_over(record)

    def release_stream(self, task_id: str, index: int) -> None:
        record = self.tasks.get(task_id)
        self.streams.release(record, index)
        if record is not None and getattr(record.spec, "generator_backpressure", -1) > 0:
            self.stream_consumed(task_id, 1 << 62)  # nobody takes the rest: no pause

    def stream_consumed(self, task_id: str, count: int) -> None:
        """The caller of a streaming generator with backpressure took ``count`` of its
        values: its worker is told (it pauses while too many are not taken)."""
        record = self.tasks.get(task_id)
        if record is None or count <= record.stream_consumed:
            return
        record.stream_consumed = count
        self._tell_consumed(record)

    def _tell_consumed(self, record: TaskRecord) -> None:
        spec = record.spec
        worker = (
            self.actor_director.worker_of(spec.actor_id)
            if spec.actor_id is not None
            else record.worker
        )
        if worker is not None and worker.conn is not None and record.stream_consumed:
            worker.conn.send(p.StreamConsumed(spec.task_id, record.stream_consumed))

    def finish_ok(self, record: TaskRecord, returns: list[p.ObjectLocation]) -> None:
        spec = record.spec
        self.ended["FINISHED"] += 1
        if spec.streaming:
            record.state = "FINISHED"
            self.streams.end(record, [self.finished_event(record)], None)
            self.task_over(record)
            return
        if record.placed_from is None:
            events = [self.finished_event(record), *self._created_events(record, returns)]
        else:  # run for another node: the values (inline) or where they are, then finished
            events = [*self._created_events(record, returns), self.finished_event(record)]
            if spec.dynamic:  # its values, beside its one return: kept for that node too
                for location in returns[1:]:
                    if location.error is None:
                        self.remote_tasks.keep_for_owner(location.object_id)
        record.state = "FINISHED"
        self.store.make_durable_then_ready(
            returns, events, record.submitter, urgent=not record.answered
        )
        self.task_over(record)

    def _created_events(self, record: TaskRecord, made: list[p.ObjectLocation]) -> list[Event]:
        """The ``created`` events of values a task made (charged to the store here);
        a task run for another node's says where they are, or has them inline. An
        error among them (the last value of a dynamic generator that raised) is none."""
        spec = record.spec
        address = self.remote_tasks.address if record.placed_from is not None else None
        events = []
        for location in made:
            if location.error is not None:
                continue
            if location.region is None:
                self.objects.charge(location.size, force=True)
            data = location.inline if address is not None else None
            events.append(
                self.store.created_event(
                    location,
                    spec.task_id,
                    spec.job_id,
                    data=data,
                    kept_at=address,
                    owner_node=record.owner_node if address is not None else None,
                )
            )
        return events

    def finished_event(self, record: TaskRecord) -> Event:
        spec = record.spec
        payload: dict[str, Any] = {"attempt": record.attempt}
        if record.output_digest is not None:
            payload["output_digest"] = record.output_digest
        payload.update(to_owner(record))
        return Event(
            K.TASK,
            spec.task_id,
            "finished",
            payload,
            job_id=spec.job_id,
            node_id=self.node_id,
        )

    def finish_failed(
        self,
        record: TaskRecord,
        error: p.ErrorInfo,
        *,
        log_event: bool,
        made: list[p.ObjectLocation] | None = None,
    ) -> None:
        """The task failed with ``error``; ``made``: values it made before (a generator
        with an int num_returns), which keep them (``p.outcome``), as in Ray -- but
        not those of a task run for another node, whose owner takes only its error."""
        spec = record.spec
        self.ended["FAILED"] += 1
        kind = "cancelled" if error.kind == "cancelled" else "failed"
        payload: dict[str, Any] = (
            {}
            if kind == "cancelled"
            else {"error": f"{error.kind}: {error.message}"[:2000], "attempt": record.attempt}
        )
        if error.traceback and kind == "failed":  # (its end: where it was raised)
            payload["traceback"] = error.traceback[-_TRACEBACK_CHARS:]
        payload.update(to_owner(record))
        events = (
            [Event(K.TASK, spec.task_id, kind, payload, job_id=spec.job_id, node_id=self.node_id)]
            if log_event
            else []
        )
        record.state = kind.upper()
        if spec.streaming:
            self.streams.end(record, events, error)
            self.task_over(record)
            return
        made = made or []
        if record.placed_from is not None:
            self.store.discard(made)
            made = []
        events += self._created_events(record, made)
        locations = p.outcome(spec.return_ids(), made, error)
        owner = None if record.answered else record.submitter  # (it has them already)
        self.store.make_durable_then_ready(locations, events, owner, urgent=not record.answered)
        self.task_over(record)

    def task_over(self, record: TaskRecord) -> None:
        self.tasks.over(record)
        self.reconstructor.done(record.spec.task_id)

    def retry(self, record: TaskRecord, reason: str) -> None:
        self.tasks.retry_attempt(record, reason)
        self.enqueue(record)

    def next_attempt(self, record: TaskRecord, reason: str) -> None:
        self.tasks.next_attempt(record, reason)

    def worker_lost(self, handle: WorkerHandle, exit_code: int) -> None:
        record = self.worker_pool.task_over(handle)
        if record is None:
            return
        self.worker_pool.set_blocked(handle, False)
        self.scheduler.give_back(record)
        record.worker = None
        if record.force_cancel:
            self.finish_failed(
                record,
                p.ErrorInfo.cancelled(record.spec.name),
                log_event=True,
            )
        elif record.retries_left != 0:
            self.retry(record, f"worker {handle.worker_id} died (exit code {exit_code})")
        else:
            self.finish_failed(
                record,
                p.ErrorInfo(
                    "worker_crashed",
                    f"the worker running {record.spec.name} died unexpectedly (exit code "
                    f"{exit_code}) and no retries were left",
                    record.spec.name,
                ),
                log_event=True,
            )

    def cancel(self, object_id: str, force: bool, recursive: bool) -> str | None:
        """``ray.cancel`` of the task (or actor call) that makes ``object_id``: see
        ``_cancel``; nothing if it is over or not this node's. Why it is refused, if
        it is (force=True of an actor's call, as in Ray)."""
        record = self.tasks.making(object_id)
        if record is None:
            return None
        if force and record.spec.actor_id is not None:
            return "refused: force=True is not supported for actor tasks"
        self._cancel(record, force, recursive)
        return None

    def _cancel(self, record: TaskRecord, force: bool, recursive: bool) -> None:
        """A queued task never runs; a running one gets KeyboardInterrupt (SIGINT), or
        with ``force`` its worker is killed; an actor's call is the actor director's to
        cancel. ``recursive``: the tasks it submitted too (force is not passed on to
        actor calls, as in Ray)."""
        if record.state in ("FINISHED", "FAILED", "CANCELLED"):
            return
        if recursive:
            for child in self.tasks.children_of(record.spec.task_id):
                self._cancel(child, force and child.spec.actor_id is None, recursive)
        if record.spec.actor_id is not None:
            if record.spec.method != "__init__":
                self.actor_director.cancel_call(record)
            return
        record.cancelled = True
        if record.worker is None:
            self.scheduler.withdraw(record)
            self.spills.forget(record.spec.task_id)  # its results no longer wanted
            self.finish_failed(
                record,
                p.ErrorInfo.cancelled(record.spec.name),
                log_event=True,
            )
        elif force:
            record.force_cancel = True
            with contextlib.suppress(ProcessLookupError):
                record.worker.process.kill()
        else:
            with contextlib.suppress(ProcessLookupError):
                record.worker.process.send_signal(signal.SIGINT)
