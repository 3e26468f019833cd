"""The node daemon's clients -- drivers, workers, `cairn status` -- each on a connection
to the node's socket: its hello, the messages it sends (each routed to the part that
owns what it is about), its references to objects, and what its end lets go.

``Clients`` owns the open connections and the jobs' ids."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from controlplane.eventlog import EntityKind, Event
from controlplane.eventlog.clock import PROCESS_CLOCK
from controlplane.node import rpc
from controlplane.node.parts import NodeParts
from controlplane.node.runtime_envs import env_key
from controlplane.node.task_table import Connection
from controlplane.node.workers import WorkerHandle
from dataplane import protocol as p
from dataplane.transfer import LinkError

log = logging.getLogger("cairn.node")
_PEER_TIMEOUT_S = 5.0
K = EntityKind


class Clients:
    def __init__(
        self, parts: NodeParts, session_dir: Path, gcs_url: str, stopping: asyncio.Event
    ) -> None:
        """``stopping``: set once the daemon stops (workers that go are not replaced)."""
        self.parts = parts
        self.objects = parts.store.objects
        self.node_id = parts.node_id
        self.session_dir = session_dir
        self.gcs_url = gcs_url
        self._stopping = stopping
        self._open: dict[int, Connection] = {}  # by id(): connected drivers, workers
        self._answering: set[asyncio.Task[None]] = set()  # requests answered later
        # job ids are unique in the log's whole history (which outlives daemons and
        # holds every node's jobs): a random prefix drawn per daemon, then a counter
        job_prefix = f"{secrets.randbits(32):08x}"
        self._job_ids = (f"{job_prefix}{n:08x}" for n in itertools.count(1))

    def tell_all(self, message: p.Shutdown) -> None:
        for conn in list(self._open.values()):
            conn.send(message)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer)
        try:
            hello = await p.read_message(reader)
            if not isinstance(hello, p.Hello):
                raise p.ProtocolError(f"expected Hello, got {type(hello).__name__}")
            self._welcome(conn, hello)
            self._open[id(conn)] = conn
            while True:
                message = await p.read_message(reader)
                self._dispatch(conn, message)
                # the log may be behind (results of direct calls are visible before
                # their events commit): reading stops until it catches up
                await self.parts.recorder.caught_up()
        except p.ProtocolError as exc:  # a damaged or truncated message: this one goes
            who = f"{conn.role or 'client'} (pid {conn.pid or '?'})"
            log.warning("node daemon: closing the connection of a %s: %s", who, exc)
            with contextlib.suppress(Exception):
                writer.write(p.encode(p.Shutdown(f"the node daemon closed this connection: {exc}")))
        except (EOFError, ConnectionError):
            pass
        except Exception:
            log.exception("node daemon: error serving a %s", conn.role or "client")
        finally:
            self._open.pop(id(conn), None)
            await self._disconnected(conn)
            writer.close()

    def _welcome(self, conn: Connection, hello: p.Hello) -> None:
        conn.role, conn.pid, conn.worker_id = hello.role, hello.pid, hello.worker_id
        if hello.role == "worker":
            handle = self.parts.worker_pool.connected(hello.worker_id, conn)
            conn.job_id = None
            self.parts.recorder.log(
                [
                    Event(
                        K.WORKER,
                        handle.worker_id,
                        "started",
                        {"pid": hello.pid},
                        node_id=self.node_id,
                    )
                ]
            )
        elif hello.role == "observer":  # `cairn status`: reads, runs nothing
            conn.job_id = None
        else:
            conn.job_id = self._next_job_id(tuple(getattr(hello, "avoid_servers", ())))
            self.parts.names.job_started(conn.job_id, hello.namespace or uuid.uuid4().hex)
            if getattr(hello, "log_to_driver", True):  # its workers' output is sent to it
                self.parts.worker_pool.output.drivers[conn.job_id] = conn
            submitted = {"entrypoint": f"driver pid {hello.pid}", "driver_node_id": self.node_id}
            if hello.replay_of:
                submitted["replay_of"] = hello.replay_of
            events = [
                Event(K.JOB, conn.job_id, "submitted", submitted),
                Event(K.JOB, conn.job_id, "started", {}),
            ]
            if submission_id := getattr(hello, "submission_id", None):
                submitted["submission_id"] = submission_id
                started = {"job_id": conn.job_id, "driver_node_id": self.node_id, "pid": hello.pid}
                events.append(Event(K.SUBMISSION, submission_id, "driver_started", started))
            self.parts.recorder.log(events)
        conn.send(
            p.Welcome(
                self.node_id,
                conn.job_id or "",
                str(self.session_dir),
                self.gcs_url,
                self.parts.resources.total,
                self.parts.names.namespace(None, conn.job_id or ""),
                self.parts.labels,
            )
        )
        worker = self.parts.worker_pool.of(conn)
        if worker is not None and worker.actor_id is not None:
            self.parts.actor_director.worker_connected(worker)
        self.parts.scheduler.schedule()

    def _next_job_id(self, avoid_servers: tuple[int, ...]) -> str:
        """The next job id, skipping those whose events would go to a server in
        ``avoid_servers`` (a replay while one does not answer). Ids map to servers by a
        hash, so a few draws find one (if every server is avoided, the last drawn)."""
        for _ in range(1000):
            job_id = next(self._job_ids)
            if self.parts.recorder.server_of_job(job_id) not in avoid_servers:
                break
        return job_id

    async def _disconnected(self, conn: Connection) -> None:
        conn.closed = True
        self.parts.store.writer_gone(conn)  # room it took and never filled
        for object_id, views in list(conn.viewing.items()):
            self._viewing(conn, object_id, -views)
        for object_id in list(conn.holding):
            self.objects.release(object_id)
        conn.holding.clear()
        self.parts.actor_director.owner_gone(conn)
        self.parts.placement_groups.owner_gone(conn)
        if conn.role == "driver" and conn.job_id:
            self.parts.worker_pool.output.drivers.pop(conn.job_id, None)
            self.parts.recorder.log([Event(K.JOB, conn.job_id, "finished", {})])
        elif conn.role == "worker" and (
            gone := await self.parts.worker_pool.gone(conn.worker_id or "")
        ):
            self._worker_gone(*gone)

    async def reap_workers(self, idle_for: float, every: float = 0.5) -> None:
        """A worker process that died before it said hello has no connection whose end
        would tell: found here, and handled as a worker whose connection ended (its
        place taken by a new one, its actor restarted), or the node would wait for it
        for ever. Pool workers beyond the pool's size idle for ``idle_for`` seconds are
        retired here too (``WorkerPool.retire_idle``)."""
        while True:
            await asyncio.sleep(every)
            for handle in self.parts.worker_pool.exited_unconnected():
                if gone := await self.parts.worker_pool.gone(handle.worker_id):
                    self._worker_gone(*gone)
            self.parts.worker_pool.retire_idle(idle_for)

    def _worker_gone(self, handle: WorkerHandle, exit_code: int) -> None:
        self.parts.recorder.log(
            [
                Event(
                    K.WORKER,
                    handle.worker_id,
                    "died",
                    # (retired: made to exit, idle or for a worker of another env)
                    {"cause": "retired" if handle.retiring else "exited", "exit_code": exit_code},
                    node_id=self.node_id,
                )
            ]
        )
        if handle.actor_id is not None:
            self.parts.actor_director.worker_lost(handle, exit_code)
            return
        if handle.task is not None:
            self.parts.runs.worker_lost(handle, exit_code)
        if not self._stopping.is_set():
            self.parts.worker_pool.replace(handle)
            self.parts.scheduler.schedule()

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        """Answers a request whose answer waits on other nodes, off the reading loop."""
        task = asyncio.get_running_loop().create_task(work)
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _flush_output(self, conn: Connection, request_id: int) -> None:
        with contextlib.suppress(Exception):  # (nothing more to show, then)
            await self.parts.worker_pool.output.flush(everywhere=True)
        conn.send(p.Reply(request_id))

    async def _memory_summary(self, conn: Connection, request_id: int) -> None:
        """Every live node's object store: this one's, and each other's (its
        ``MemorySummary`` call; one that does not answer is named, with why)."""
        nodes = [self.parts.memory_summary()]
        link = self.parts.link
        for address in link.peer_addresses() if link is not None else []:
            try:
                call = rpc.Link().unary(address, "MemorySummary")
                nodes.append(await call({}, timeout=_PEER_TIMEOUT_S))
            except LinkError as exc:
                nodes.append({"address": address, "error": str(exc)})
        conn.send(p.Reply(request_id, {"nodes": nodes}))

    def _dispatch(self, conn: Connection, message: object) -> None:
        match message:
            case p.RefCounts(deltas):
                self._ref_counts(conn, deltas)
            case p.RegisterFunction(function_id, blob, name):
                self.parts.tasks.add_function(function_id, blob, name)
            case p.SubmitTask(spec):
                self.parts.runs.submit(conn, spec)
            case p.SubmitDirectCall():
                self.parts.actor_director.submit_direct(conn, message)
            case p.WatchActor(actor_id):
                self.parts.actor_director.watch(conn, actor_id)
            case p.PushObjects(object_ids):
                self.parts.store.push(conn, object_ids)
            case p.PutObject(location, task_id, durable):
                self._hold(conn, location.object_id)
                self.parts.store.taken(conn, [location])
                self.parts.store.put(location, task_id, self._job_of(conn, task_id), durable)
            case p.ReserveShm(request_id, size):
                self.parts.store.reserve(conn, request_id, size)
            case p.ReleaseShm(region, offset):
                self.parts.store.give_back(conn, region, offset)
            case p.ViewObject(request_id, object_id, timeout):
                self._view(conn, request_id, object_id, timeout)
            case p.ViewCounts(deltas):
                for object_id, delta in deltas.items():
                    self._viewing(conn, object_id, delta)
            case p.GetObjects(request_id, object_ids, timeout):
                self._get(conn, request_id, object_ids, timeout)
            case p.WaitObjects(request_id, object_ids, num_returns, timeout, _fetch):
                self._wait(conn, request_id, object_ids, num_returns, timeout)
            case p.StreamItem():
                self.parts.store.taken(conn, [message.location])
                self.parts.runs.stream_item(message)
            case p.StreamConsumed(task_id, count):
                self.parts.runs.stream_consumed(task_id, count)
            case p.ReleaseStream(task_id, index):
                self.parts.runs.release_stream(task_id, index)
                self._ref_counts(
                    conn,
                    {
                        oid: -1
                        for oid in conn.holding
                        if len(oid) == len(task_id) + 8
                        and oid.startswith(task_id)
                        and p.return_index(oid) >= index
                    },
                )
            case p.TaskDone():
                self.parts.store.taken(conn, message.returns)
                self.parts.runs.task_done(self.parts.worker_pool.of(conn), message)
            case p.CancelTask(request_id, object_id, force, recursive):
                refused = self.parts.runs.cancel(object_id, force, recursive)
                conn.send(p.Reply(request_id, error=refused))
            case p.CreatePlacementGroup():
                self._hold(conn, message.ready_object_id)
                self.parts.placement_groups.create(conn, message)
            case p.RemovePlacementGroup(pg_id):
                self.parts.placement_groups.remove(pg_id)
            case p.PlacementGroupTable():
                self.parts.placement_groups.table(conn, message)
            case p.ReserveActorName():
                self.parts.names.reserve(conn, message)
            case p.GetActor():
                self.parts.names.get(conn, message)
            case p.ListNamedActors():
                self.parts.names.list(conn, message)
            case p.PrepareRuntimeEnv(runtime_env):
                if env_key(runtime_env) is not None:
                    self.parts.scheduler.envs.launch_for(runtime_env, conn)
            case p.KillActor(actor_id, no_restart):
                self.parts.actor_director.kill(actor_id, no_restart)
            case p.ReportLost(object_id, reason):
                self.parts.reconstructor.object_lost(object_id, reason)
            case p.ClusterInfoRequest(request_id):
                conn.send(p.Reply(request_id, self.parts.info()))
            case p.MemorySummaryRequest(request_id):
                self._later(self._memory_summary(conn, request_id))
            case p.FlushOutput(request_id):
                self._later(self._flush_output(conn, request_id))
            case p.MetricsReport(points):
                self.parts.metrics.received(points)
            case p.LogSeen(position):
                PROCESS_CLOCK.saw(position)
            case p.ClusterNodesRequest(request_id):
                self.parts.remote_tasks.answer_nodes(conn, request_id)
            case _:
                raise p.ProtocolError(f"unexpected message {type(message).__name__}")

    # -- objects -------------------------------------------------------------------

    def _job_of(self, conn: Connection, task_id: str | None) -> str | None:
        """The job an object put by ``conn`` belongs to: a driver's own, or that of the
        task (or actor call) its worker runs."""
        if conn.job_id is not None or task_id is None:
            return conn.job_id
        record = self.parts.tasks.get(task_id)
        return record.spec.job_id if record is not None else None

    def _hold(self, conn: Connection, object_id: str) -> None:
        """``conn``'s process holds a ref to the object (it goes once none does)."""
        conn.holding.add(object_id)
        self.objects.hold(object_id)

    def _ref_counts(self, conn: Connection, deltas: dict[str, int]) -> None:
        for object_id, delta in deltas.items():
            if delta > 0 and object_id not in conn.holding:
                conn.holding.add(object_id)
                self.objects.hold(object_id)
            elif delta < 0 and object_id in conn.holding:
                conn.holding.discard(object_id)
                self.objects.release(object_id)

    def _view(
        self, conn: Connection, request_id: int, object_id: str, timeout: float | None
    ) -> None:
        """Where ``conn``'s process may read the object: answered once it is in the
        store (or when ``timeout`` passed), and viewed from then on (pinned until the
        view ends)."""
        if self.objects.state(object_id) in ("unknown", "freed"):
            conn.send(p.Reply(request_id, self.objects.location(object_id)))
            return

        def ready(timed_out: bool) -> None:
            if timed_out:
                conn.send(p.Reply(request_id, error="timeout: get timed out"))
                return
            location = self.objects.location(object_id)
            if location.region is not None and location.error is None:
                self._viewing(conn, object_id, 1)
            conn.send(p.Reply(request_id, location))

        self.objects.when_ready([object_id], 1, timeout, ready)

    def _viewing(self, conn: Connection, object_id: str, delta: int) -> None:
        """Views of an object by ``conn``'s process begin (+) or end (-); each pins it."""
        views = conn.viewing.get(object_id, 0)
        delta = max(delta, -views)
        if views + delta:
            conn.viewing[object_id] = views + delta
        else:
            conn.viewing.pop(object_id, None)
        for _ in range(delta):
            self.objects.pin(object_id)
        for _ in range(-delta):
            self.objects.unpin(object_id)

    def _get(
        self, conn: Connection, request_id: int, object_ids: list[str], timeout: float | None
    ) -> None:
        handle = self.parts.worker_pool.of(conn)
        waiting = [oid for oid in object_ids if not self.objects.is_ready(oid)]
        if waiting and handle is not None and handle.task is not None and not handle.blocked:
            self.parts.scheduler.block(handle)

        def finish(timed_out: bool) -> None:
            if handle is not None and handle.blocked:
                self.parts.scheduler.unblock(handle)
            if timed_out:
                conn.send(p.Reply(request_id, error="timeout: get timed out"))
            else:
                conn.send(p.Reply(request_id, [self.objects.location(oid) for oid in object_ids]))

        self.objects.when_ready(object_ids, len(object_ids), timeout, finish)

    def _wait(
        self,
        conn: Connection,
        request_id: int,
        object_ids: list[str],
        num_returns: int,
        timeout: float | None,
    ) -> None:
        def finish(_timed_out: bool) -> None:
            conn.send(p.Reply(request_id, self.objects.ready_in_order(object_ids, num_returns)))

        self.objects.when_ready(object_ids, num_returns, timeout, finish)
