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

A mixin of NodeDaemon.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane.eventlog import EntityKind, Event
from controlplane.eventlog.connection import connect
from controlplane.sql import queries
from dataplane import protocol as p
from dataplane import shm

if TYPE_CHECKING:
    from controlplane.node.daemon import TaskRecord

log = logging.getLogger("cairn.node")
K = EntityKind
_PUT_SUFFIX = "0" * 8  # put objects' ids end so; return ids count from 1


def creating_task(object_id: str) -> str | None:
    """The task whose return an object is; None for ``put`` objects."""
    if len(object_id) <= 8 or object_id.endswith(_PUT_SUFFIX):
        return None
    return object_id[:-8]


class ReconstructionMixin:
    rebuilding: set[str]  # tasks being re-run to rebuild their objects

    def _object_lost(self: Any, object_id: str, reason: str, *, needed: bool = False) -> None:
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
        if task_id is not None and task_id in self.tasks:
            self._mark_lost(object_id, reason)
            return
        old = self.objects.unready(object_id)  # waiters wait for the rebuilt value
        if old is not None and old.shm_name is not None:
            shm.unlink_segment(old.shm_name)  # what is left of it (damaged) goes
        if (task_id or object_id) in self.rebuilding:
            return
        self.rebuilding.add(task_id or object_id)
        self.recorder.log([self._lost_event(object_id, reason)])
        if task_id is None:
            self._spawn(self._recover_put(object_id, reason))
        else:
            self._spawn(self._rebuild(task_id, object_id, reason))

    async def _recover_put(self: Any, object_id: str, reason: str) -> None:
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
        self.rebuilding.discard(object_id)
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
        self._schedule()

    def _mark_lost(self: Any, object_id: str, reason: str) -> None:
        if self.objects.mark_lost(object_id, reason):
            self.recorder.log([self._lost_event(object_id, reason)])

    def _lost_event(self: Any, object_id: str, reason: str) -> Event:
        return Event(K.OBJECT, object_id, "lost", {"reason": reason}, node_id=self.node_id)

    def _present(self: Any, object_id: str) -> bool:
        """Whether an object's value is here now (its segment too)."""
        location = self.objects.stored(object_id)
        if location is None:
            return False
        return location.shm_name is None or (shm.SHM_DIR / location.shm_name).exists()

    async def _rebuild(self: Any, task_id: str, object_id: str, reason: str) -> None:
        try:
            spec, attempt = await self._lineage(task_id)
        except Exception as exc:  # the GCS is unreachable, or the log lacks the task
            why = f"its lineage could not be read from the log: {exc}"
            self._give_up_rebuild(task_id, [object_id], _lost(object_id, why))
            return
        returns = spec.return_ids()
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
            old = self.objects.unready(other)
            if old is not None and old.shm_name is not None:
                shm.unlink_segment(old.shm_name)
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
                self._object_lost(dep, f"an argument of {spec.name}, being rebuilt, is gone")
            elif state in ("freed", "unknown"):
                why = f"an argument of {spec.name}, being rebuilt, was freed"
                self._object_lost(dep, why, needed=True)
        self._run_rebuild(self._rebuild_record(spec, attempt))

    async def _lineage(self: Any, task_id: str) -> tuple[p.TaskSpec, int]:
        """A task's spec from its ``submitted`` event, and the attempt its re-run is."""
        row = await self._read_row("task_lineage", task_id)
        if row is None or row["submitted"] is None:
            raise LookupError(f"the log has no submitted event for task {task_id}")
        spec, _ = p.submitted_spec(row["submitted"])
        if spec.function_id and spec.function_id not in self.functions:
            raise LookupError(f"the code of {spec.name} is not known on this node")
        return spec, int(row["attempt"] or 0) + 1

    async def _read_row(self: Any, query: str, key: str) -> Any:
        """One row of the log, read through a GCS restart (a rebuild started while
        PostgreSQL is down waits for it, as appends do, rather than give the object up)."""

        async def read() -> Any:
            conn = await connect(self.gcs_url)
            try:
                return await conn.fetchrow(queries[query], key)
            finally:
                await conn.close()

        return await self._while_unavailable(read)

    def _rebuild_record(self: Any, spec: p.TaskSpec, attempt: int) -> TaskRecord:
        from controlplane.node.daemon import TaskRecord

        retries_left = -1 if spec.max_retries < 0 else max(0, spec.max_retries - attempt)
        record = TaskRecord(spec, None, attempt=attempt, retries_left=retries_left)
        self.tasks[spec.task_id] = record
        for object_id in (*spec.dependencies(), *spec.contained_refs):
            self.objects.pin(object_id)
        record.pending_deps = {d for d in spec.dependencies() if not self.objects.is_ready(d)}
        return record

    def _run_rebuild(self: Any, record: TaskRecord) -> None:
        if not record.pending_deps:
            self._enqueue(record)
            return
        record.state = "WAITING_FOR_DEPENDENCIES"
        for dep in list(record.pending_deps):
            self.objects.on_ready(dep, lambda d=dep, r=record: self._dep_done(r, d))

    def _give_up_rebuild(self: Any, task_id: str, returns: list[str], error: p.ErrorInfo) -> None:
        self.rebuilding.discard(task_id)
        log.warning("not rebuilding %s: %s", returns, error.message)
        for object_id in returns:
            self.objects.unready(object_id)
            self.objects.ready(p.ObjectLocation(object_id, error=error))

    def _wait_for_lost_arguments(self: Any, record: TaskRecord, reason: str) -> bool:
        """A task that failed because an argument's bytes were gone runs again once
        the argument is rebuilt (not counted as a retry); False if none is being
        rebuilt (then the loss is the task's error)."""
        waiting = {d for d in record.spec.dependencies() if not self.objects.is_ready(d)}
        if not waiting:
            return False
        self._next_attempt(record, reason)
        record.pending_deps = waiting
        self._run_rebuild(record)
        return True


def _lost(object_id: str, message: str) -> p.ErrorInfo:
    return p.ErrorInfo("object_lost", f"object {object_id} was lost: {message}")
