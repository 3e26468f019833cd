"""The node's worker processes: started, connected, idle, running a task, blocked in a
``get``, gone. Pool workers run the node's tasks one at a time; an actor's worker is its
own, outside the pool. This module alone changes a worker's state; the local scheduler
asks it for an idle worker and tells it what runs where."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dataplane import protocol as p

if TYPE_CHECKING:
    from controlplane.node.runtime_envs import Launch
    from controlplane.node.task_table import Connection, TaskRecord
    from controlplane.node.worker_output import WorkerOutput

_WORKER = [sys.executable, "-m", "dataplane.worker"]


@dataclass
class WorkerHandle:
    """One worker process, as the pool sees it (read elsewhere, changed here only)."""

    worker_id: str
    process: subprocess.Popen[bytes]
    conn: Connection | None = None
    task: TaskRecord | None = None
    functions: set[str] = field(default_factory=set)  # code it was sent already
    blocked: bool = False  # its task waits in get(): its CPU is lent out
    actor_id: str | None = None  # a dedicated actor worker, outside the pool
    runs: dict[str, int] = field(default_factory=dict)  # tasks run, per function (max_calls)
    env_key: str | None = None  # the runtime_env it started in (runtime_envs.py); None: none
    retiring: bool = False  # made way for a worker of another env, or idle: it exits
    idle_since: float = 0.0  # (time.monotonic()) when it last became idle


class WorkerPool:
    """``size`` pool workers (more while some are blocked), and actors' workers. A pool
    worker runs the tasks of the runtime_env it started in (``env_key``, None for plain
    ones); an idle one of another env makes way when the pool is full."""

    def __init__(self, node_id: str, socket_path: str, size: int, output: WorkerOutput) -> None:
        self._node_id = node_id
        self._socket_path = socket_path
        self.output = output  # where its workers' stdout and stderr go
        self.size = size
        self._workers: dict[str, WorkerHandle] = {}
        self._idle: dict[str | None, deque[WorkerHandle]] = {None: deque()}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[WorkerHandle]:
        return iter(list(self._workers.values()))

    def start(self, actor_id: str | None = None, launch: Launch | None = None) -> WorkerHandle:
        """A new worker process (for the pool, or for the actor ``actor_id``), in the
        runtime_env ``launch`` sets up; it is usable once it connected (``connected``)."""
        worker_id = f"{self._node_id}-w{next(self._ids)}"
        # the last argument: the worker dies with this process
        argv = [self._socket_path, worker_id, str(os.getpid())]
        out, err = self.output.files(worker_id)
        with out, err:
            if launch is None:
                process = subprocess.Popen(
                    [*_WORKER, *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err
                )
            else:
                env = dict(os.environ)
                env["PYTHONPATH"] = os.pathsep.join(
                    [*launch.path, *filter(None, [env.get("PYTHONPATH")])]
                )
                process = subprocess.Popen(
                    [launch.python, *_WORKER[1:], *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=launch.cwd,
                    env=env,
                )
        self.output.watch(worker_id, process.pid)
        handle = self._workers[worker_id] = WorkerHandle(
            worker_id, process, actor_id=actor_id, env_key=launch.key if launch else None
        )
        return handle

    def fill(self) -> None:
        """Starts the pool's workers (at the daemon's start)."""
        for _ in range(self.size):
            self.start()

    def grow(self, launch: Launch | None = None) -> None:
        """One more pool worker (in ``launch``'s runtime_env), if the pool is not full:
        it counts its blocked workers out, so that tasks waiting on nested ones cannot
        deadlock the node. A full pool retires an idle worker of another env for it."""
        key = launch.key if launch else None
        if self._over_size():
            other = next((q for k, q in self._idle.items() if k != key and q), None)
            if other is None:
                # as Ray, a task whose resources are free gets a worker even beyond the
                # pool's size (one of no CPUs while the pool's workers are all busy, or
                # blocked), one at a time; it stays in the pool (as the idle workers a
                # node keeps; a task's metrics are sent from its worker while it lives)
                starting = any(
                    h.conn is None and h.actor_id is None and not h.retiring and h.env_key == key
                    for h in self._workers.values()
                )
                if not starting:
                    self.start(launch=launch)
                return
            retired = other.popleft()
            retired.retiring = True
            with contextlib.suppress(ProcessLookupError):
                retired.process.terminate()  # its connection's end forgets it
        self.start(launch=launch)

    def connected(self, worker_id: str | None, conn: Connection) -> WorkerHandle:
        """The worker ``worker_id`` said hello on ``conn``: a pool worker is idle now."""
        handle = self._workers.get(worker_id or "")
        if handle is None:
            raise p.ProtocolError(f"unknown worker {worker_id}")
        handle.conn = conn
        if handle.actor_id is None:
            self.idle_again(handle)
        return handle

    def of(self, conn: Connection) -> WorkerHandle | None:
        """The worker behind a connection (None for a driver)."""
        return self._workers.get(conn.worker_id or "") if conn.role == "worker" else None

    def alive(self, worker_id: str) -> bool:
        """Whether the worker's connection has not ended yet."""
        return worker_id in self._workers

    def has_idle(self, env_key: str | None = None) -> bool:
        return bool(self._idle.get(env_key))

    def run(self, record: TaskRecord, env_key: str | None = None) -> WorkerHandle:
        """The next idle worker of the runtime_env ``env_key``, now running ``record``."""
        handle = self._idle[env_key].popleft()
        handle.task = record
        return handle

    def first_use(self, handle: WorkerHandle, function_id: str) -> bool:
        """Whether ``function_id``'s code is new to the worker (then it is sent with the
        task, and counted as sent)."""
        if function_id in handle.functions:
            return False
        handle.functions.add(function_id)
        return True

    def set_blocked(self, handle: WorkerHandle, blocked: bool) -> None:
        handle.blocked = blocked

    def task_over(self, handle: WorkerHandle) -> TaskRecord | None:
        """The worker's task ended (or its worker died): it runs nothing now; the task
        it ran, if any."""
        record, handle.task = handle.task, None
        return record

    def idle_again(self, handle: WorkerHandle) -> None:
        handle.idle_since = time.monotonic()
        self._idle.setdefault(handle.env_key, deque()).append(handle)

    def retire_idle(self, idle_for: float) -> list[WorkerHandle]:
        """Pool workers beyond the pool's size (started while others were blocked in a
        ``get``, or for tasks of no CPU), idle for ``idle_for`` seconds: they exit, the
        longest idle first, as Ray's idle workers above its soft limit do, or the node
        would keep every worker a burst of nested tasks ever needed. Returns them."""
        now = time.monotonic()
        idle = sorted(
            (h for queue in self._idle.values() for h in queue if now - h.idle_since >= idle_for),
            key=lambda h: h.idle_since,
        )
        retired = idle[: max(0, self._beyond_size())]
        for handle in retired:
            self._idle[handle.env_key].remove(handle)
            handle.retiring = True
            with contextlib.suppress(ProcessLookupError):
                handle.process.terminate()  # its connection's end forgets it
        return retired

    def after_task(self, handle: WorkerHandle, spec: p.TaskSpec) -> None:
        """The worker ran ``spec`` to its end: idle again, or, once it ran as many of
        its function's tasks as ``max_calls`` allows, it exits (its connection's end
        starts another in its place)."""
        limit = getattr(spec, "max_calls", 0)
        if limit:
            done = handle.runs[spec.function_id] = handle.runs.get(spec.function_id, 0) + 1
            if done >= limit:
                with contextlib.suppress(ProcessLookupError):
                    handle.process.terminate()
                return
        self.idle_again(handle)

    def _over_size(self) -> bool:
        """Whether the pool holds its size of workers, not counting the blocked ones
        (their CPUs are lent out) nor those leaving."""
        return self._beyond_size() >= 0

    def _beyond_size(self) -> int:
        """How many pool workers (not leaving) there are beyond the pool's size and its
        blocked ones."""
        pool = sum(1 for h in self._workers.values() if h.actor_id is None and not h.retiring)
        blocked = sum(1 for h in self._workers.values() if h.blocked)
        return pool - (self.size + blocked)

    def replace(self, gone: WorkerHandle) -> None:
        """A plain worker in place of a pool worker that ended, unless it was retired
        for a worker of another env (started already)."""
        if not gone.retiring:
            self.start()

    def exited_unconnected(self) -> list[WorkerHandle]:
        """Workers whose process ended before it said hello: no connection of theirs
        will ever end, so nothing else would notice (killed while starting, say)."""
        return [
            h for h in self._workers.values() if h.conn is None and h.process.poll() is not None
        ]

    def running_tasks(self) -> int:
        return sum(1 for h in self._workers.values() if h.task is not None)

    async def gone(self, worker_id: str) -> tuple[WorkerHandle, int] | None:
        """A worker's connection ended: it is killed if it still runs, waited for, and
        forgotten; it and its exit code (None if it was not known)."""
        handle = self._workers.pop(worker_id, None)
        if handle is None:
            return None
        with contextlib.suppress(ValueError, KeyError):
            self._idle[handle.env_key].remove(handle)
        with contextlib.suppress(ProcessLookupError):
            handle.process.kill()
        exit_code = await asyncio.to_thread(handle.process.wait)
        self.output.ended(handle.process.pid)
        return handle, exit_code

    async def stop(self) -> None:
        """Kills every worker and waits for them (the daemon's shutdown)."""
        workers = list(self._workers.values())
        self._workers.clear()
        self._idle = {None: deque()}
        for handle in workers:
            with contextlib.suppress(ProcessLookupError):
                handle.process.kill()
        for handle in workers:
            await asyncio.to_thread(handle.process.wait)
