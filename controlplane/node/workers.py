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
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dataplane import protocol as p

if TYPE_CHECKING:
    from controlplane.node.task_table import Connection, TaskRecord

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


class WorkerPool:
    """``size`` pool workers (more while some are blocked), and actors' workers."""

    def __init__(self, node_id: str, socket_path: str, size: int) -> None:
        self._node_id = node_id
        self._socket_path = socket_path
        self.size = size
        self._workers: dict[str, WorkerHandle] = {}
        self._idle: deque[WorkerHandle] = deque()
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[WorkerHandle]:
        return iter(list(self._workers.values()))

    def start(self, actor_id: str | None = None) -> WorkerHandle:
        """A new worker process (for the pool, or for the actor ``actor_id``); it is
        usable once it connected (``connected``)."""
        worker_id = f"{self._node_id}-w{next(self._ids)}"
        process = subprocess.Popen(
            # the last argument: the worker dies with this process
            [*_WORKER, self._socket_path, worker_id, str(os.getpid())],
            stdin=subprocess.DEVNULL,
        )
        handle = self._workers[worker_id] = WorkerHandle(worker_id, process, actor_id=actor_id)
        return handle

    def fill(self) -> None:
        """Starts the pool's workers (at the daemon's start)."""
        for _ in range(self.size):
            self.start()

    def grow(self) -> None:
        """One more pool worker, if the pool is not full: it counts its blocked workers
        out, so that tasks waiting on nested ones cannot deadlock the node."""
        pool = sum(1 for h in self._workers.values() if h.actor_id is None)
        blocked = sum(1 for h in self._workers.values() if h.blocked)
        if pool < self.size + blocked:
            self.start()

    def connected(self, worker_id: str | None, conn: Connection) -> WorkerHandle:
        """The worker ``worker_id`` said hello on ``conn``: a pool worker is idle now."""
        handle = self._workers.get(worker_id or "")
        if handle is None:
            raise p.ProtocolError(f"unknown worker {worker_id}")
        handle.conn = conn
        if handle.actor_id is None:
            self._idle.append(handle)
        return handle

    def of(self, conn: Connection) -> WorkerHandle | None:
        """The worker behind a connection (None for a driver)."""
        return self._workers.get(conn.worker_id or "") if conn.role == "worker" else None

    def alive(self, worker_id: str) -> bool:
        """Whether the worker's connection has not ended yet."""
        return worker_id in self._workers

    def has_idle(self) -> bool:
        return bool(self._idle)

    def run(self, record: TaskRecord) -> WorkerHandle:
        """The next idle worker, now running ``record``."""
        handle = self._idle.popleft()
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
        self._idle.append(handle)

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
        self._idle.append(handle)

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
        with contextlib.suppress(ValueError):
            self._idle.remove(handle)
        with contextlib.suppress(ProcessLookupError):
            handle.process.kill()
        return handle, await asyncio.to_thread(handle.process.wait)

    async def stop(self) -> None:
        """Kills every worker and waits for them (the daemon's shutdown)."""
        workers = list(self._workers.values())
        self._workers.clear()
        self._idle.clear()
        for handle in workers:
            with contextlib.suppress(ProcessLookupError):
                handle.process.kill()
        for handle in workers:
            await asyncio.to_thread(handle.process.wait)
