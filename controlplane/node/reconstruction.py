"""Lineage reconstruction: an object whose bytes are lost while something still needs
it is rebuilt by re-running the task that made it, read back from the log (its
``submitted`` event holds the spec), recursively for lost arguments -- the Ray
paper's lineage replay, with the log as the lineage store.

- **When**: a client finds a segment gone (``ReportLost``), a task finds an argument
  gone (it then waits for the argument's rebuild and runs again), or an argument of a
  task being rebuilt is gone or was freed.
- **What is logged**: ``lost`` for the object, then ``reconstructing`` for the task
  {object_id, attempt, reason}; the re-run then logs ``scheduled``, ``running``,
  ``finished`` and ``created`` with that attempt, like any run.
- **Limits, as in Ray**: an object made by ``put`` or by an actor's method has no
  lineage to re-run (ObjectLostError);
  nor has one whose task has ``max_retries=0`` (reconstruction off for it); a task
  rebuilt more often than ``max_retries`` allows (counting retries, from the log)
  gives ObjectReconstructionFailedMaxAttemptsExceededError.

The reconstructor owns which tasks are being re-run for this (``rebuilding``); the tasks
themselves are the node's (``TaskRunner``: it records, queues and runs them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from controlplane.eventlog import EntityKind, Event
from controlplane.eventlog.connection import KeptConnection, retry_while_unavailable
from controlplane.node.recorder import EventRecorder
from controlplane.sql import queries
from dataplane import protocol as p
from dataplane import shm
from dataplane.arena import region_name
from dataplane.object_table import ObjectTable
from dataplane.spilling import Spiller

if TYPE_CHECKING:
    from controlplane.node.task_table import TaskRecord


log = logging.getLogger("cairn.node")
K = EntityKind
_PUT_SUFFIX = "0" * 8  # put objects' ids end so; return ids count from 1


def creating_task(object_id: str) -> str | None:
    """The task whose return an object is; None for ``put`` objects."""
    if len(object_id) <= 8 or object_id.endswith(_PUT_SUFFIX):
        return None
    return object_id[:-8]


class TaskRunner(Protocol):
    """What the reconstructor asks of the node's tasks."""

    def has_task(self, task_id: str) -> bool:
        """Whether the task is the node's now (queued, waiting or running)."""
        ...

    def knows_function(self, function_id: str) -> bool: ...

    def add_rebuild(self, spec: p.TaskSpec, attempt: int) -> TaskRecord:
        """The node's task again, for its ``attempt``-th run (its arguments pinned)."""
        ...

    def run_when_ready(self, record: TaskRecord) -> None:
        """Queues the task once its arguments are all here."""
        ...

    def next_attempt(self, record: TaskRecord, reason: str) -> None: ...

    def schedule(self) -> None: ...


class Reconstructor:
    def __init__(
        self,
        node_id: str,
        gcs_url: str,
        objects: ObjectTable,
        recorder: EventRecorder,
        spiller: Spiller,
        tasks: TaskRunner,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.node_id = node_id
        self.gcs_url = gcs_url
        self._gcs = KeptConnection(gcs_url)  # (a rebuild reads lineage, maybe many)
        self.objects = objects
        self.recorder = recorder
        self.spiller = spiller
        self.tasks = tasks
        self._spawn = spawn
        self._rebuilding: set[str] = set()  # tasks (or puts) being rebuilt

    def done(self, task_id: str) -> None:
        """The task is over: a rebuild of it is no longer under way."""
        self._rebuilding.discard(task_id)

    def object_lost(self, object_id: str, reason: str, *, needed: bool = False) -> None:
        """An object's bytes are gone: rebuild it if it has lineage, else it stands for
        ObjectLostError from now on. ``needed``: also one already freed (an argument of
        a task being rebuilt)."""
        state = self.objects.state(object_id)
        if state == "spilled" and not needed:
            return  # its bytes are on disk: restored when wanted
        if state in ("pending", "error") or (
            state not in ("stored", "remote", "spilled") and not needed
        ):
            return  # on its way (or back) already, or not a value
        task_id = creating_task(object_id)
        if task_id is not None and self.tasks.has_task(task_id):
            self._mark_lost(object_id, reason)
            return
        # waiters wait for the rebuilt value; what is left of the old one (damaged) is
        # given back once the object is freed (a reader may still map it)
        self.objects.unready(object_id)
        if (task_id or object_id) in self._rebuilding:
            return
        self._rebuilding.add(task_id or object_id)
        self.recorder.log([self._lost_event(object_id, reason)])
        if task_id is None:
            self._spawn(self._recover_put(object_id, reason))
        else:
            self._spawn(self._rebuild(task_id, object_id, reason))

    async def _recover_put(self, object_id: str, reason: str) -> None:
        """A put has no task to re-run: its value comes back from the log (small ones)
        or from its durable copy (put(durable=True)), else it is lost for good."""
        try:
            row = await self._read_row("put_value", object_id)
            if row is None:
                raise LookupError("the log has no created event for it")
            if row["data"] is not None:
                location = p.ObjectLocation(object_id, inline=row["data"], size=len(row["data"]))
                self.objects.charge(location.size, force=True)
            elif row["durable_path"] and (
                loaded := await self.spiller.load_file(
                    object_id, Path(row["durable_path"]), int(row["size"])
                )
            ):
                location = loaded
            else:
                raise LookupError(
                    "it was made by put, which has no task to re-run, and is not durable "
                    "(put(durable=True) keeps a copy)"
                )
        except Exception as exc:
            self._give_up_rebuild(object_id, [object_id], _lost(object_id, f"{reason}; {exc}"))
            return
        self._rebuilding.discard(object_id)
        self.recorder.log(
            [
                Event(
                    K.OBJECT,
                    object_id,
                    "restored",
                    {"size_bytes": location.size},
                    node_id=self.node_id,
                )
            ]
        )
        self.objects.ready(location)
        self.tasks.schedule()

    def _mark_lost(self, object_id: str, reason: str) -> None:
        if self.objects.mark_lost(object_id, reason):
            self.recorder.log([self._lost_event(object_id, reason)])

    def _lost_event(self, object_id: str, reason: str) -> Event:
        return Event(K.OBJECT, object_id, "lost", {"reason": reason}, node_id=self.node_id)

    def _present(self, object_id: str) -> bool:
        """Whether an object's value is here now (its store region too)."""
        location = self.objects.stored(object_id)
        if location is None:
            return False
        if location.region is None:
            return True
        return (shm.SHM_DIR / region_name(self.node_id, location.region)).exists()

    async def _rebuild(self, task_id: str, object_id: str, reason: str) -> None:
        try:
            spec, attempt = await self._lineage(task_id)
        except Exception as exc:  # the GCS is unreachable, or the log lacks the task
            why = f"its lineage could not be read from the log: {exc}"
            self._give_up_rebuild(task_id, [object_id], _lost(object_id, why))
            return
        # (a streaming generator's values are rebuilt one by one, matched by index)
        returns = [object_id] if spec.streaming else spec.return_ids()
        if spec.actor_id is not None:
            why = f"{reason}; it was made by an actor's method ({spec.name}), which is not re-run"
            self._give_up_rebuild(task_id, returns, _lost(object_id, why))
            return
        if spec.max_retries == 0:
            error = _lost(
                object_id,
                f"{reason}; it is not reconstructed because its task {spec.name} has max_retries=0",
            )
            self._give_up_rebuild(task_id, returns, error)
            return
        if 0 <= spec.max_retries < attempt:
            error = p.ErrorInfo(
                "reconstruction_failed",
                f"object {object_id} was lost ({reason}) and its task {spec.name} has been "
                f"run {attempt} times, more than max_retries={spec.max_retries} allows",
                spec.name,
            )
            self._give_up_rebuild(task_id, returns, error)
            return
        for other in returns:  # a re-run makes all of them again
            self.objects.unready(other)
        self.recorder.log(
            [
                Event(
                    K.TASK,
                    task_id,
                    "reconstructing",
                    {"object_id": object_id, "attempt": attempt, "reason": reason[:2000]},
                    job_id=spec.job_id,
                    node_id=self.node_id,
                )
            ]
        )
        for dep in spec.dependencies():  # recursively, arguments gone or freed meanwhile
            state = self.objects.state(dep)
            if state == "stored" and not self._present(dep):
                self.object_lost(dep, f"an argument of {spec.name}, being rebuilt, is gone")
            elif state in ("freed", "unknown"):
                why = f"an argument of {spec.name}, being rebuilt, was freed"
                self.object_lost(dep, why, needed=True)
        record = self.tasks.add_rebuild(spec, attempt)
        if spec.streaming:
            record.stream_rebuilding = {object_id}
        self.tasks.run_when_ready(record)

    async def _lineage(self, task_id: str) -> tuple[p.TaskSpec, int]:
        """A task's spec from its ``submitted`` event, and the attempt its re-run is."""
        row = await self._read_row("task_lineage", task_id)
        if row is None or row["submitted"] is None:
            raise LookupError(f"the log has no submitted event for task {task_id}")
        spec, _ = p.submitted_spec(row["submitted"])
        if spec.function_id and not self.tasks.knows_function(spec.function_id):
            raise LookupError(f"the code of {spec.name} is not known on this node")
        return spec, int(row["attempt"] or 0) + 1

    async def _read_row(self, query: str, key: str) -> Any:
        """One row of the log, read through a GCS restart (a rebuild started while
        PostgreSQL is down waits for it, as appends do, rather than give the object up)."""

        async def read() -> Any:
            async with self._gcs.use() as conn:
                return await conn.fetchrow(queries[query], key)

        return await retry_while_unavailable(
            self.gcs_url, read, timeout=self.recorder.unavailable_timeout
        )

    def _give_up_rebuild(self, task_id: str, returns: list[str], error: p.ErrorInfo) -> None:
        self._rebuilding.discard(task_id)
        log.warning("not rebuilding %s: %s", returns, error.message)
        for object_id in returns:
            self.objects.unready(object_id)
            self.objects.ready(p.ObjectLocation(object_id, error=error))

    def wait_for_lost_arguments(self, record: TaskRecord, reason: str) -> bool:
        """A task that failed because an argument's bytes were gone runs again once
        the argument is rebuilt (not counted as a retry); False if none is being
        rebuilt (then the loss is the task's error)."""
        waiting = {d for d in record.spec.dependencies() if not self.objects.is_ready(d)}
        if not waiting:
            return False
        self.tasks.next_attempt(record, reason)
        record.pending_deps = waiting
        self.tasks.run_when_ready(record)
        return True


def _lost(object_id: str, message: str) -> p.ErrorInfo:
    return p.ErrorInfo("object_lost", f"object {object_id} was lost: {message}")
