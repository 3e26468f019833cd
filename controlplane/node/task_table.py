"""The tasks this node has in hand -- submitted here, placed here by another node, or
rebuilt here from the log -- and the code of the functions they run. A task's record
(its attempt, state, the arguments it still waits for, its worker and resources) is
added and removed here and nowhere else; a task's ``submitted`` event (its lineage,
with the function's code the first time one of its tasks is logged) and its
``retried`` events are logged here."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controlplane.eventlog import EntityKind, Event
from controlplane.node.recorder import EventRecorder
from controlplane.node.runtime_envs import env_hash
from dataplane import protocol as p
from dataplane.object_table import ObjectTable

if TYPE_CHECKING:
    from controlplane.node.placement_groups import Bundle
    from controlplane.node.workers import WorkerHandle


@dataclass
class Connection:
    """One client (driver or worker) connected to the daemon."""

    writer: asyncio.StreamWriter
    role: str = ""
    pid: int = 0
    worker_id: str | None = None
    job_id: str | None = None
    holding: set[str] = field(default_factory=set)
    # ranges of the store reserved by its process and not yet sent as objects:
    # (region, offset) -> size (controlplane/node/object_store.py, ``reserve``)
    reserved: dict[tuple[int, int], int] = field(default_factory=dict)
    # objects in the store its process reads: views begun and not ended, per object
    # (each pins its object, controlplane/node/clients.py)
    viewing: dict[str, int] = field(default_factory=dict)
    closed: bool = False
    _outgoing: list[bytes] = field(default_factory=list)

    def send(self, message: object) -> None:
        """Queues a message; what one turn of the event loop sends to a client goes in
        one write (one system call and one wake-up of the client, not one each)."""
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._write)
        self._outgoing.append(p.encode(message))

    def _write(self) -> None:
        data, self._outgoing = b"".join(self._outgoing), []
        if not self.writer.is_closing():
            self.writer.write(data)


@dataclass
class TaskRecord:
    spec: p.TaskSpec
    submitter: Connection | None  # None: placed here by another node, which owns it
    attempt: int = 0
    state: str = "SUBMITTED"
    pending_deps: set[str] = field(default_factory=set)
    worker: WorkerHandle | None = None
    cancelled: bool = False
    force_cancel: bool = False
    retries_left: int = 0
    placed_from: str | None = None  # placed here: the address of the node that spilled it
    # the node its end events are addressed to (``owner_node``: controlplane/README.md,
    # "Reading only what concerns a reader"): the node that spilled it, for one placed
    # here; this node, for one it spilled (the global schedulers read its end)
    owner_node: str | None = None
    pulled: list[str] = field(default_factory=list)  # argument copies pulled for it
    placed_back: bool = False  # spilled, then placed on this node: not spilled again
    # the daemon's own call to an actor: "replay" (an earlier call, re-run to rebuild its
    # state), "checkpoint" (__cairn_save__) or "restore" (__cairn_load__)
    internal: str | None = None
    placed_on: str | None = None  # spilled and placed on that node
    gpu_ids: list[str] = field(default_factory=list)  # the GPUs it was given
    bundle: Bundle | None = None  # the placement group bundle it runs in
    output_digest: str | None = None  # of the returns of its attempt that finished
    direct: bool = False  # an actor call its caller sent straight to the actor's worker
    answered: bool = False  # ... which the worker answered to the caller itself
    reported_infeasible: bool = False  # its submitter was told it cannot run here
    # a generator's (controlplane/node/streams.py): values made so far, whether the
    # last was its error, and from which index on its caller no longer holds them
    streamed: int = 0
    stream_errored: bool = False
    stream_held_below: int = 1 << 62
    stream_consumed: int = 0  # ... how many its caller took (with backpressure only)
    # ... re-run to rebuild these lost values of it (reconstruction.py): only they are
    # made again, matched by index
    stream_rebuilding: set[str] | None = None


def to_owner(record: TaskRecord) -> dict[str, str]:
    """What addresses an event of ``record`` to the node that owns it (``owner_node``:
    controlplane/README.md, "Reading only what concerns a reader"); {} if none."""
    return {"owner_node": record.owner_node} if record.owner_node is not None else {}


class TaskTable:
    def __init__(self, node_id: str, objects: ObjectTable, recorder: EventRecorder) -> None:
        self.node_id = node_id
        self.objects = objects
        self.recorder = recorder
        self._tasks: dict[str, TaskRecord] = {}
        self._functions: dict[str, tuple[bytes, str]] = {}  # id -> (code, name)
        self._logged_functions: set[str] = set()

    # -- reading -------------------------------------------------------------------

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._tasks

    def __iter__(self) -> Iterator[TaskRecord]:
        return iter(list(self._tasks.values()))

    def get(self, task_id: str) -> TaskRecord | None:
        return self._tasks.get(task_id)

    def making(self, object_id: str) -> TaskRecord | None:
        """The task in hand that returns (or yields) ``object_id``, if any."""
        record = self._tasks.get(object_id[:-8])
        if record is None or not (record.spec.streaming or object_id in record.spec.return_ids()):
            return None
        return record

    def children_of(self, task_id: str) -> list[TaskRecord]:
        return [r for r in self._tasks.values() if r.spec.parent_task_id == task_id]

    def waiting(self) -> int:
        """How many wait for their arguments."""
        return sum(1 for r in self._tasks.values() if r.state == "WAITING_FOR_DEPENDENCIES")

    # -- functions -----------------------------------------------------------------

    def add_function(self, function_id: str, blob: bytes, name: str) -> None:
        self._functions.setdefault(function_id, (blob, name))

    def knows_function(self, function_id: str) -> bool:
        return function_id in self._functions

    def code_of(self, function_id: str | None) -> bytes | None:
        """The function's pickled code (None if unknown here, or no function)."""
        return self._functions.get(function_id, (None, ""))[0] if function_id else None

    # -- adding and removing ---------------------------------------------------------

    def submit(
        self,
        submitter: Connection,
        spec: p.TaskSpec,
        *,
        direct: bool = False,
        data: bytes | None = None,
    ) -> TaskRecord:
        """Records a submitted task: its returns are held by the submitter, its
        arguments pinned, and its ``submitted`` event (the lineage) is logged; the
        function itself is logged with the first task that uses it."""
        record = TaskRecord(spec, submitter, retries_left=spec.max_retries, direct=direct)
        self._tasks[spec.task_id] = record
        for object_id in spec.return_ids():
            submitter.holding.add(object_id)
            self.objects.hold(object_id)
            self.objects.expect(object_id)
        self._pin_arguments(record)
        blob = None
        if spec.function_id and spec.function_id not in self._logged_functions:
            self._logged_functions.add(spec.function_id)
            blob = self.code_of(spec.function_id)
        payload: dict[str, Any] = {
            "name": spec.name,
            "function": spec.function_id,
            "num_returns": spec.num_returns,
            "max_retries": spec.max_retries,
            "resources": spec.resources,
            "dependencies": spec.dependencies(),
            "options": {"retry_exceptions": spec.retry_exceptions},
        }
        runtime_env = getattr(spec, "runtime_env", None)  # (a spec from before it: none)
        if runtime_env:
            payload["runtime_env"] = runtime_env
            payload["runtime_env_hash"] = env_hash(runtime_env)
        if getattr(spec, "dag_id", None):
            payload["dag_id"] = spec.dag_id
        if getattr(spec, "label_selector", None):
            payload["label_selector"] = spec.label_selector
        if getattr(spec, "labels", None):
            payload["labels"] = spec.labels
        if getattr(spec, "max_task_retries", None) is not None:  # an actor call's own
            payload["options"]["max_task_retries"] = spec.max_task_retries
        if spec.actor_id is not None:
            payload.update(actor_id=spec.actor_id, method=spec.method or "", sequence=spec.sequence)
        # what the state API (controlplane/state_api.py) shows of it, as Ray's TaskState:
        # its function's own name where a name option replaced it, its parent, its group
        if spec.actor_id is None:
            function_name = self._functions.get(spec.function_id or "", (b"", ""))[1]
            if function_name and function_name != spec.name:
                payload["function_name"] = function_name
        if spec.parent_task_id:
            payload["parent_task_id"] = spec.parent_task_id
        if spec.strategy and spec.strategy[0] == "PLACEMENT_GROUP":
            payload["placement_group_id"] = spec.strategy[1]
        if direct:  # sent straight to the actor's worker (controlplane/node/actors.py)
            payload["direct"] = True
        self.recorder.log(
            [
                Event(
                    EntityKind.TASK,
                    spec.task_id,
                    "submitted",
                    payload,
                    job_id=spec.job_id,
                    node_id=self.node_id,
                    data=(data or p.encode(spec)) if blob is None else p.encode((spec, blob)),
                )
            ]
        )
        return record

    def add_rebuild(self, spec: p.TaskSpec, attempt: int) -> TaskRecord:
        """A task of the log re-run to rebuild a lost object (its lineage is logged)."""
        retries_left = -1 if spec.max_retries < 0 else max(0, spec.max_retries - attempt)
        record = TaskRecord(spec, None, attempt=attempt, retries_left=retries_left)
        self._tasks[spec.task_id] = record
        self._pin_arguments(record)
        return record

    def add_placed(
        self,
        spec: p.TaskSpec,
        attempt: int,
        owner_address: str,
        blob: bytes | None = None,
        *,
        owner_node: str | None,
    ) -> TaskRecord:
        """A task (or actor call) another node owns, run here: its owner keeps its
        arguments, which are pulled for it (``pulled``)."""
        if blob is not None and spec.function_id:
            self.add_function(spec.function_id, blob, spec.name)
        record = TaskRecord(spec, None, attempt=attempt, retries_left=spec.max_retries)
        record.placed_from, record.owner_node = owner_address, owner_node
        self._tasks[spec.task_id] = record
        return record

    def keep(self, record: TaskRecord) -> None:
        """Takes back a record that was over (the constructor of an actor made anew
        elsewhere), its arguments pinned again as a submitted task's."""
        if record.spec.task_id in self._tasks:
            return
        self._tasks[record.spec.task_id] = record
        for object_id in (*record.spec.dependencies(), *record.spec.contained_refs):
            self.objects.pin(object_id)

    def over(self, record: TaskRecord) -> None:
        """The task is done here: what it pinned (or pulled) is let go."""
        if record.placed_from is not None:  # placed here: only its argument copies
            for object_id in record.pulled:
                self.objects.release(object_id)
        else:
            for object_id in (*record.spec.dependencies(), *record.spec.contained_refs):
                self.objects.unpin(object_id)
        self._tasks.pop(record.spec.task_id, None)

    def retry_attempt(self, record: TaskRecord, reason: str) -> None:
        """A new attempt that uses up one of its retries (unless they are unlimited):
        after a failure it may have begun, where ``next_attempt`` is one that costs none."""
        record.retries_left -= record.retries_left > 0
        self.next_attempt(record, reason)

    def next_attempt(self, record: TaskRecord, reason: str) -> None:
        """A task (or call) starts a new attempt: its ``retried`` event says why."""
        record.attempt += 1
        self.recorder.log(
            [
                Event(
                    EntityKind.TASK,
                    record.spec.task_id,
                    "retried",
                    {"attempt": record.attempt, "reason": reason[:2000]},
                    job_id=record.spec.job_id,
                )
            ]
        )

    def _pin_arguments(self, record: TaskRecord) -> None:
        spec = record.spec
        for object_id in (*spec.dependencies(), *spec.contained_refs):
            self.objects.pin(object_id)
        record.pending_deps = {d for d in spec.dependencies() if not self.objects.is_ready(d)}
