"""`cairn replay`: re-runs a recorded job from the log on the current cluster and finds
the first task whose output differs from the recorded one.

The log holds everything a re-run needs: each task's spec (function, arguments,
options) and code in its `submitted` event, the values of the job's small puts (and the
durable copy of large ones) with their `created` events, and each finished task's
output digest. The replay driver is a job of its own, whose `submitted` event names the
job it replays (``replay_of``).

What is submitted again: the tasks and actor calls the original driver submitted, in
their original order, with new ids (arguments that were the original's puts or task
results name the new ones). Tasks that tasks submitted are not: their parents submit
them again when they run. Replayed tasks are matched to the recorded ones by id for
those the replay submits, and by parent and order of submission for the others. With
``--task`` only that task and what it depends on are submitted, all by the replay
driver.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.errors import GcsError
from controlplane.gcs_url import redact
from controlplane.readonly_sql import run_readonly
from controlplane.sql import queries
from dataplane import protocol as p
from dataplane.client import CoreClient, DaemonError
from dataplane.serialization import deserialize, serialize_with_refs


class ReplayError(GcsError):
    """The job cannot be replayed (the message says why); nothing was submitted, or
    what was is named."""


class UnknownIdError(ReplayError):
    """The job or task id is not in the log."""


@dataclass
class RecordedTask:
    position: int
    spec: p.TaskSpec
    outcome: str | None = None  # finished, failed, cancelled; None: never ended
    digest: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Comparison:
    """One recorded task and its re-run (None: it was not run again)."""

    original: RecordedTask
    replayed: RecordedTask | None

    @property
    def same(self) -> bool:
        if self.replayed is None or self.original.outcome != self.replayed.outcome:
            return False
        return self.original.outcome != "finished" or self.original.digest == self.replayed.digest


@dataclass
class ReplayReport:
    job_id: str
    replay_job_id: str
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def first_divergence(self) -> Comparison | None:
        """The earliest-submitted task whose re-run ended otherwise or with another
        output: the first nondeterministic one (tasks after it may differ because of it)."""
        return next((c for c in self.comparisons if not c.same), None)


@dataclass(frozen=True)
class _WholeLog:
    """Where a replay reads the log: through server 0's union, without the servers it
    leaves out (they do not answer)."""

    url: str
    without: tuple[int, ...] = ()

    def query(self, name: str, *args: Any) -> list[dict[str, Any]]:
        """One named read-only query's rows."""
        read = run_readonly(self.url, queries[name], args, without=self.without)
        columns, rows = asyncio.run(read)
        return [dict(zip(columns, row, strict=True)) for row in rows]


class RecordedJob:
    """A job as the log recorded it: its tasks in submission order, how each ended, the
    code of their functions and the values of its puts."""

    def __init__(self, log: _WholeLog, job_id: str) -> None:
        self.log = log
        self.job_id = job_id
        if not log.query("job_known", job_id)[0]["known"]:
            raise UnknownIdError(f"no job {job_id!r} in the log")
        self.tasks: dict[str, RecordedTask] = {}
        self.code: dict[str, bytes] = {}
        for row in log.query("replay_job_tasks", job_id):
            spec, blob = p.submitted_spec(row["data"])
            self.tasks[spec.task_id] = RecordedTask(row["position"], spec)
            if blob is not None:
                self.code.setdefault(spec.function_id, blob)
        self.last_position = max((t.position for t in self.tasks.values()), default=0)
        _fill_outcomes(log, self.tasks)

    def top_level(self) -> list[RecordedTask]:
        """What the job's driver submitted itself, in order."""
        return [t for t in self.tasks.values() if t.spec.parent_task_id is None]

    def upstream(self, task_id: str) -> list[RecordedTask]:
        """``task_id`` and every task of the job whose results it needs, directly or
        not, in submission order."""
        if task_id not in self.tasks:
            raise UnknownIdError(f"no task {task_id!r} in job {self.job_id}")
        needed: set[str] = set()
        stack = [task_id]
        while stack:
            current = stack.pop()
            if current in needed:
                continue
            needed.add(current)
            spec = self.tasks[current].spec
            if spec.actor_id is not None:  # a call needs its actor (and its earlier calls)
                stack += [
                    t.spec.task_id
                    for t in self.tasks.values()
                    if t.spec.actor_id == spec.actor_id
                    and t.position < self.tasks[current].position
                ]
            for object_id in (*spec.dependencies(), *spec.contained_refs):
                maker = _creating_task(object_id)
                if maker in self.tasks:
                    stack.append(maker)
        return sorted((self.tasks[t] for t in needed), key=lambda t: t.position)

    def function_code(self, function_id: str) -> bytes:
        """The code of a function: logged with the first task of it each node ran, in
        this job or an earlier one."""
        if function_id in self.code:
            return self.code[function_id]
        after = 0
        while rows := self.log.query(
            "replay_function_code", function_id, after, self.last_position
        ):
            for row in rows:
                _, blob = p.submitted_spec(row["data"])
                if blob is not None:
                    self.code[function_id] = blob
                    return blob
            after = rows[-1]["position"]
        raise ReplayError(f"the log has no code for function {function_id}")

    def put_value(self, object_id: str) -> bytes:
        """A put's serialized value: in its `created` event if small, else its durable copy."""
        rows = self.log.query("replay_put_value", object_id)
        if not rows:
            raise ReplayError(f"the log has no record of the object {object_id}")
        row = rows[0]
        if row["data"] is not None:
            return bytes(row["data"])
        if row["durable_path"]:
            try:
                return Path(row["durable_path"]).read_bytes()
            except OSError as exc:
                raise ReplayError(
                    f"the durable copy of put {object_id} cannot be read: {exc}"
                ) from None
        raise ReplayError(
            f"the value of put {object_id} ({row['size']:,} bytes) was not recorded: puts "
            "larger than the inline limit are recorded only when durable (put(..., "
            "durable=True) or CAIRN_DURABLE_PUTS=1 when the job runs)"
        )


def _creating_task(object_id: str) -> str | None:
    """The task whose return an object is (None for a put): ids are the task's + 8 hex."""
    if len(object_id) <= 8 or object_id.endswith("00000000"):
        return None
    return object_id[:-8]


def _fill_outcomes(log: _WholeLog, tasks: dict[str, RecordedTask]) -> None:
    for row in log.query("replay_task_outcomes", list(tasks)):
        task = tasks[row["task_id"]]
        task.outcome, task.digest, task.error = row["outcome"], row["digest"], row["error"]


class _Resubmitter:
    """Submits recorded specs again through a driver connection, renaming ids."""

    def __init__(self, job: RecordedJob, client: CoreClient, notes: list[str]) -> None:
        self.job = job
        self.client = client
        self.notes = notes
        self.renamed: dict[str, str] = {}  # old object/actor/task id -> new

    def submit(self, recorded: RecordedTask) -> p.TaskSpec:
        spec = recorded.spec
        for object_id in spec.dependencies():
            if self._renamed(object_id) is None:
                self._provide(object_id, spec)
        if spec.contained_refs:
            self.notes.append(
                f"task {spec.task_id} ({spec.name}) holds refs inside its argument values; "
                "they still name the original objects"
            )
        new_id = uuid.uuid4().hex
        actor_id, options = spec.actor_id, spec.actor_options
        if actor_id is not None:
            if spec.method == "__init__":
                self.renamed[actor_id] = uuid.uuid4().hex
                if options is not None:  # a replayed actor is anonymous: the name may be taken
                    options = dataclasses.replace(options, name=None, detached=False)
            elif actor_id not in self.renamed:
                raise ReplayError(
                    f"call {spec.task_id} ({spec.name}) is to actor {actor_id}, which this "
                    "job did not create: it cannot be replayed"
                )
            actor_id = self.renamed[actor_id]
        strategy = spec.strategy
        if strategy and strategy[0] in ("NODE_AFFINITY", "PLACEMENT_GROUP"):
            self.notes.append(
                f"task {spec.task_id} ({spec.name}) ran with {strategy[0]}; replayed without"
            )
            strategy = None
        new = dataclasses.replace(
            spec,
            task_id=new_id,
            job_id=self.client.welcome.job_id,
            args=[self._arg(a) for a in spec.args],
            kwargs={k: self._arg(a) for k, a in spec.kwargs.items()},
            parent_task_id=None,
            actor_id=actor_id,
            actor_options=options,
            strategy=strategy,
        )
        self.renamed[spec.task_id] = new_id
        for old, fresh in zip(spec.return_ids(), new.return_ids(), strict=True):
            self.renamed[old] = fresh
        if new.function_id and not (new.actor_id and new.method != "__init__"):
            code = self.job.function_code(new.function_id)
            self.client.register_function(new.function_id, code, new.name)
        self.client.submit(new)
        return new

    def _arg(self, arg: p.Arg) -> p.Arg:
        if arg.ref is None:
            return arg
        renamed = self._renamed(arg.ref)
        assert renamed is not None  # (provided by submit)
        return p.Arg(ref=renamed)

    def _renamed(self, object_id: str) -> str | None:
        """The replay's id of an object: a put or return named again, or a value a
        generator yielded (made by the re-run generator at the same index)."""
        if object_id in self.renamed:
            return self.renamed[object_id]
        task_id = _creating_task(object_id)
        new_task = self.renamed.get(task_id) if task_id is not None else None
        return new_task + object_id[-8:] if new_task is not None else None

    def _provide(self, object_id: str, spec: p.TaskSpec) -> None:
        """A put the task reads, put again (from its recorded value)."""
        maker = _creating_task(object_id)
        if maker is not None:
            raise ReplayError(
                f"task {spec.task_id} ({spec.name}) reads object {object_id}, made by task "
                f"{maker}, which this replay does not re-run (a task submitted by a task "
                "whose result reached the driver): replay it with --task"
            )
        blob = self.job.put_value(object_id)
        try:
            value = deserialize(blob)
            serialized, contained = serialize_with_refs(value)
        except Exception as exc:
            raise ReplayError(
                f"the recorded value of put {object_id} cannot be read: {exc}"
            ) from exc
        new_id = uuid.uuid4().hex + "00000000"
        self.client.put(new_id, serialized, None, contained)
        self.renamed[object_id] = new_id


def replay(
    url: str,
    socket_path: str | Callable[[], str],
    job_id: str,
    *,
    task_id: str | None = None,
    timeout: float = 600.0,
    progress: Callable[[int, int], None] | None = None,
    without: Sequence[int] = (),
) -> ReplayReport:
    """Replays ``job_id`` (or only ``task_id`` and its upstream) through the node at
    ``socket_path`` (or the one it returns, once the ids are known to be good) and
    compares every re-run task with the recorded one.

    ``without``: servers of the log that do not answer, left out of its reads (the job's
    own events must lie on another: a job's events are on its shard's server); the
    replay is a job the node names for a server that answers."""
    log = _WholeLog(url, tuple(without))
    job = RecordedJob(log, job_id)
    chosen = job.upstream(task_id) if task_id is not None else job.top_level()
    if not chosen:
        raise ReplayError(f"job {job_id} submitted no tasks: there is nothing to replay")
    if callable(socket_path):
        socket_path = socket_path()
    client = CoreClient(socket_path, "driver", replay_of=job_id, avoid_servers=tuple(without))
    report = ReplayReport(job_id, client.welcome.job_id)
    try:
        running = _WholeLog(client.welcome.gcs_url, log.without).query("log_identity")
        if running != log.query("log_identity"):
            raise ReplayError(
                f"the running cluster keeps another log ({redact(client.welcome.gcs_url)}) "
                f"than the one holding job {job_id} ({redact(url)}): a job is replayed on "
                "the cluster of its own log"
            )
        resubmitter = _Resubmitter(job, client, report.notes)
        submitted = [(recorded, resubmitter.submit(recorded)) for recorded in chosen]
        deadline = time.monotonic() + timeout
        for done, (_, new) in enumerate(submitted, 1):
            _wait_for(client, new.return_ids(), deadline)
            if progress is not None:
                progress(done, len(submitted))
        _wait_for_job(log, report.replay_job_id, deadline)
    finally:
        client.close()
    replayed = RecordedJob(log, report.replay_job_id)
    pairs = {new.task_id: recorded.spec.task_id for recorded, new in submitted}
    report.comparisons = _compare(job, replayed, pairs, only=task_id is not None)
    return report


def _wait_for(client: CoreClient, object_ids: Sequence[str], deadline: float) -> None:
    if not object_ids:
        return
    try:
        client.get_locations(list(object_ids), max(0.1, deadline - time.monotonic()))
    except DaemonError as exc:
        raise ReplayError(f"the replay did not finish: {exc}") from None


def _wait_for_job(log: _WholeLog, job_id: str, deadline: float) -> None:
    """Waits until every task of the replay job (nested ones too) has ended."""
    while log.query("replay_open_tasks", job_id)[0]["count"]:
        if time.monotonic() > deadline:
            raise ReplayError(f"tasks of the replay job {job_id} were still running at the timeout")
        time.sleep(0.1)


def _compare(
    original: RecordedJob, replayed: RecordedJob, pairs: dict[str, str], *, only: bool
) -> list[Comparison]:
    """Pairs every recorded task with its re-run: those the replay submitted by id,
    the others by parent and order of submission (a deterministic parent submits the
    same children in the same order)."""
    match = dict(pairs)  # replayed task id -> original task id
    children: dict[str | None, list[str]] = {}
    for task in original.tasks.values():
        children.setdefault(task.spec.parent_task_id, []).append(task.spec.task_id)
    replayed_children: dict[str | None, list[str]] = {}
    for task in replayed.tasks.values():
        replayed_children.setdefault(task.spec.parent_task_id, []).append(task.spec.task_id)
    pending = list(pairs)
    while pending:
        new_parent = pending.pop()
        old_children = children.get(match[new_parent], [])
        for new_child, old_child in zip(
            replayed_children.get(new_parent, []), old_children, strict=False
        ):
            match[new_child] = old_child
            pending.append(new_child)
    by_original = {old: replayed.tasks[new] for new, old in match.items()}
    compared = [t for t in original.tasks.values() if not only or t.spec.task_id in by_original]
    return [Comparison(t, by_original.get(t.spec.task_id)) for t in compared]
