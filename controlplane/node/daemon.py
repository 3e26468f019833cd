"""The node daemon: one per node. It wires the node's parts (controlplane/README.md,
"The node daemon's parts": the task table, the local scheduler, the worker pool, the
object store...) and routes its clients' messages to them; every transition is
recorded in the log through the one event recorder.

Durability before visibility: a task's results become visible (``get`` returns,
``wait`` counts them, the submitter is sent them) only after its ``finished`` event and
its objects' ``created`` events are durable. The events before those (``submitted``,
``scheduled``, ``running``) and bookkeeping events (``freed``, ``retried``, worker
events) are written behind, by at most 5 ms (the appender's linger), usually in the
same commit as the ``finished`` that follows; one appender keeps all of them in order,
so once ``finished`` is durable so is everything before it. A crash of the node can
lose only written-behind events of tasks whose results nobody has seen, with one
exception: an actor call sent straight to its actor's worker is answered by the worker
before its ``finished`` is durable (controlplane/node/actors.py, "Direct calls"). A ``put``
value is visible in the process that put it at once (it holds the value); to every
other process once its ``created`` event is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from controlplane.errors import GcsError, GcsIdentityError
from controlplane.eventlog import EntityKind, Event
from controlplane.eventlog.connection import retry_while_unavailable
from controlplane.node import rpc
from controlplane.node.actors import ActorDirector
from controlplane.node.cluster_link import ClusterLink, JoinOffer
from controlplane.node.local_scheduler import LocalScheduler
from controlplane.node.object_store import ObjectStore
from controlplane.node.placement_groups import PlacementGroups
from controlplane.node.reconstruction import Reconstructor
from controlplane.node.recorder import EventRecorder
from controlplane.node.remote_tasks import RemoteTasks
from controlplane.node.resources import ResourcePool, node_resources
from controlplane.node.task_runs import TaskRuns
from controlplane.node.task_table import Connection, TaskTable
from controlplane.node.workers import WorkerPool
from controlplane.tls import NodeTls
from dataplane import protocol as p
from dataplane import shm
from dataplane.transfer import Puller, object_service

T = TypeVar("T")
log = logging.getLogger("cairn.node")
K = EntityKind


class NodeDaemon:
    def __init__(
        self,
        *,
        session_dir: Path,
        gcs_url: str,
        node_id: str,
        resources: dict[str, float],
        object_store_memory: int,
        rpc_port: int | None = None,
        rpc_host: str = "127.0.0.1",
        head: bool = False,
        auth_token: str | None = None,
        join_gcs: tuple[str, bool] | None = None,
        join_gcs_replica: dict[str, Any] | None = None,
        membership_monitor: bool = False,
    ) -> None:
        self.session_dir = session_dir
        # In a cluster (rpc_port given; 0: any free port): the gRPC service, liveness
        # pings and load heartbeats; the head also lets nodes join and declares silent
        # ones dead. A private single-node cluster (sdk.init()) has none of these.
        self.rpc_port = rpc_port
        self.rpc_host = rpc_host
        self.head = head
        self.socket_path = str(session_dir / "node.sock")
        self.gcs_url = gcs_url
        self.node_id = node_id
        # with Ray's node:<ip> (and, on the head or a private cluster's one node,
        # node:__internal_head__), which tasks ask for to run on that node
        own = node_resources(rpc_host, head=head or rpc_port is None)
        self.resources = ResourcePool({**resources, **own})
        # a cluster member appends fenced: once declared dead, its appends are refused
        self.recorder = EventRecorder(
            gcs_url, writer_node=node_id if rpc_port is not None else None
        )
        self.store = ObjectStore(
            node_id,
            object_store_memory,
            session_dir / "spill",
            Path(os.environ.get("CAIRN_DURABLE_DIR") or session_dir / "durable"),
            self.recorder,
            spawn=self._spawn,
            schedule=lambda: self.scheduler.schedule(),
            fetch_remote=lambda object_id, address: self.remote_tasks.fetch(object_id, address),
            release_remote=lambda address, object_id: self._spawn(
                self.puller.release(address, object_id)
            ),
            on_lost=lambda object_id, why: self.reconstructor.object_lost(
                object_id, why, needed=True
            ),
        )
        self.objects = self.store.objects  # (the table every part reads; the store owns it)
        self.spiller = self.store.spiller
        # the GCS is not this node's log any more (wiped, replaced, put back from an
        # older copy): the daemon stops, saying why (see eventlog/fencing.py)
        self.refused: GcsIdentityError | None = None
        self.recorder.on_refused(self._gcs_refused)
        self._clients: dict[int, Connection] = {}  # by id(): connected drivers, workers
        self.tasks = TaskTable(node_id, self.objects, self.recorder)
        self.worker_pool = WorkerPool(
            node_id, self.socket_path, size=max(1, int(resources.get("CPU", 1)))
        )
        # job ids are unique in the log's whole history (which outlives daemons and
        # holds every node's jobs): a random prefix drawn per daemon, then a counter
        job_prefix = f"{secrets.randbits(32):08x}"
        self._job_ids = (f"{job_prefix}{n:08x}" for n in itertools.count(1))
        self._server: asyncio.AbstractServer | None = None
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self.placement_groups = PlacementGroups(
            node_id,
            self.resources,
            self.objects,
            self.recorder,
            in_cluster=lambda: self.link is not None and self.link.has_peers(),
            publish=self.store.make_durable_then_ready,
            created_event=self.store.created_event,
            schedule=lambda: self.scheduler.schedule(),
        )
        self.runs = TaskRuns(
            node_id,
            self.recorder,
            self.store,
            self.tasks,
            self.worker_pool,
            self.placement_groups,
        )
        self.scheduler = LocalScheduler(
            self.resources, self.placement_groups, self.worker_pool, self.runs
        )
        self.actor_director = ActorDirector(
            node_id,
            gcs_url,
            session_dir,
            self.recorder,
            self.objects,
            self.tasks,
            self.scheduler,
            self.worker_pool,
            self.placement_groups,
            self.runs,
            spawn=self._spawn,
        )
        self.reconstructor = Reconstructor(
            node_id,
            gcs_url,
            self.objects,
            self.recorder,
            self.spiller,
            self.runs,
            spawn=self._spawn,
        )
        self.puller = Puller(node_id, self.objects, rpc.Link())
        # in a cluster: the gRPC service, liveness, heartbeats, membership
        self.link: ClusterLink | None = None
        if rpc_port is not None:
            self.link = ClusterLink(
                node_id,
                gcs_url,
                rpc_host,
                rpc_port,
                self.recorder,
                auth_token=auth_token,
                tls=NodeTls.find(session_dir),
                join_offer=JoinOffer(*(join_gcs or (gcs_url, False)), join_gcs_replica)
                if head
                else None,
                membership_monitor=head or membership_monitor,
                spawn=self._spawn,
                on_fenced=lambda: self._stop_because(
                    "the cluster declared this node dead (its liveness pings stopped for too long)"
                ),
            )
        self.remote_tasks = RemoteTasks(
            node_id,
            gcs_url,
            self.recorder,
            self.objects,
            self.tasks,
            self.scheduler,
            self.placement_groups,
            self.actor_director,
            self.reconstructor,
            self.puller,
            self.link,
            self.runs,
            socket_path=self.socket_path,
            head=head,
            spawn=self._spawn,
        )
        self.runs.wire(self.scheduler, self.actor_director, self.remote_tasks, self.reconstructor)

    # -- lifecycle -----------------------------------------------------------------

    async def serve(self) -> None:
        # a daemon started while PostgreSQL restarts (after a crash of both) waits for it
        await self._while_unavailable(self.recorder.start)
        if self.rpc_port is not None:
            await self._join_cluster()
        self.recorder.log(
            [
                Event(
                    K.NODE,
                    self.node_id,
                    "registered",
                    {
                        "address": self.address or self.socket_path,
                        "resources": self.resources.total,
                        "socket": self.socket_path,
                        "head": self.head,
                        "hostname": os.uname().nodename,
                    },
                    node_id=self.node_id,
                )
            ]
        )
        listening = p.bind_private_socket(self.socket_path)  # the driver socket, 0600
        self._server = await asyncio.start_unix_server(self._client, sock=listening)
        self.worker_pool.fill()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        (self.session_dir / "node.ready").write_text(self.node_id)
        await self._stopping.wait()
        await self._shutdown()

    async def _join_cluster(self) -> None:
        """Joins the cluster (controlplane/node/cluster_link.py), then follows the log
        from where it stood then."""
        assert self.link is not None
        object_info, read_object = object_service(self.objects)
        self.recorder.on_fenced(self._fenced)
        after = await self.link.join(
            {
                "Info": lambda _request: self._cluster_info(),
                "Release": self.remote_tasks.owner_released,
                "ObjectInfo": object_info,
            },
            {"ReadObject": read_object},
            self._cluster_info,
        )
        (self.session_dir / "node.address").write_text(self.link.address)
        self._spawn(self.remote_tasks.follow_log(after), vital=True)

    @property
    def address(self) -> str:
        """host:port of the node's gRPC service ("" outside a cluster, or before)."""
        return self.remote_tasks.address

    def _fenced(self, error: GcsError) -> None:
        """The log refused this node's appends: the cluster declared it dead (it was cut
        off for longer than the death timeout). It stops; its node starts a new daemon,
        which joins under a new id."""
        self._stop_because(f"the cluster declared this node dead ({error})")

    def _gcs_refused(self, error: GcsIdentityError) -> None:
        """The GCS is not the log this node was using: wiped, replaced, or put back from
        an older copy. Going on would re-use positions and ids, so the daemon stops,
        telling its clients why; its node process does not start another daemon (it
        would refuse the same GCS) and stops too."""
        if self.refused is not None:
            return
        self.refused = error
        self._stop_because(str(error))

    def _stop_because(self, reason: str) -> None:
        """Stops the daemon for ``reason``, which its clients hear (their calls fail
        with it, instead of a bare "went away")."""
        if self._stopping.is_set():
            return
        log.error("node daemon %s stops: %s", self.node_id, reason)
        for conn in list(self._clients.values()):
            conn.send(p.Shutdown(f"the node daemon stopped: {reason}"))
        self._stopping.set()

    async def _while_unavailable(self, attempt: Callable[[], Awaitable[T]]) -> T:
        return await retry_while_unavailable(
            self.gcs_url, attempt, timeout=self.recorder.unavailable_timeout
        )

    def _spawn(self, coroutine: Any, *, vital: bool = False) -> asyncio.Task[Any]:
        """Runs ``coroutine`` in the background; if a ``vital`` one fails (the log
        follower, liveness pings...) the daemon stops rather than run half-blind."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(lambda t: self._background_done(t, vital))
        return task

    def _background_done(self, task: asyncio.Task[Any], vital: bool) -> None:
        self._background.discard(task)
        error = None if task.cancelled() else task.exception()
        if isinstance(error, GcsIdentityError):  # not this node's log: it stops, saying so
            self._gcs_refused(error)
        elif error is not None:
            if vital:
                what = getattr(task.get_coro(), "__qualname__", task.get_name())
                self._stop_because(f"{what} failed: {error!r}")
            else:
                log.error("node daemon: %s failed: %r", task.get_name(), error)

    async def _shutdown(self) -> None:
        """Stops everything but the liveness pings, commits the node's last events,
        then leaves: its ``dead`` event commits with the end of its liveness, so a
        daemon killed anywhere in here is still declared dead by the monitor."""
        pinging = self.link.ping_task if self.link is not None else None
        for task in list(self._background):
            if task is not pinging:
                task.cancel()
        if self._server is not None:
            self._server.close()
        await self.worker_pool.stop()
        dead = Event(K.NODE, self.node_id, "dead", {"cause": "shutdown"}, node_id=self.node_id)
        if self.link is None:
            self.recorder.log([dead])
        await self.recorder.close()
        if self.link is not None:
            await self.link.leave(dead)
        shm.unlink_all(self.node_id)

    # -- connections ---------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer)
        try:
            hello = await p.read_message(reader)
            if not isinstance(hello, p.Hello):
                raise p.ProtocolError(f"expected Hello, got {type(hello).__name__}")
            self._welcome(conn, hello)
            self._clients[id(conn)] = conn
            while True:
                message = await p.read_message(reader)
                self._dispatch(conn, message)
                # the log may be behind (results of direct calls are visible before
                # their events commit): reading stops until it catches up
                await self.recorder.caught_up()
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
            self._clients.pop(id(conn), None)
            await self._disconnected(conn)
            writer.close()

    def _welcome(self, conn: Connection, hello: p.Hello) -> None:
        conn.role, conn.pid, conn.worker_id = hello.role, hello.pid, hello.worker_id
        if hello.role == "worker":
            handle = self.worker_pool.connected(hello.worker_id, conn)
            conn.job_id = None
            self.recorder.log(
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
            conn.job_id = next(self._job_ids)
            self.actor_director.names.job_started(conn.job_id, hello.namespace or uuid.uuid4().hex)
            submitted = {"entrypoint": f"driver pid {hello.pid}", "driver_node_id": self.node_id}
            if hello.replay_of:
                submitted["replay_of"] = hello.replay_of
            self.recorder.log(
                [
                    Event(K.JOB, conn.job_id, "submitted", submitted),
                    Event(K.JOB, conn.job_id, "started", {}),
                ]
            )
        conn.send(
            p.Welcome(
                self.node_id,
                conn.job_id or "",
                str(self.session_dir),
                self.gcs_url,
                self.resources.total,
                self.actor_director.names.namespace(None, conn.job_id or ""),
            )
        )
        worker = self.worker_pool.of(conn)
        if worker is not None and worker.actor_id is not None:
            self.actor_director.worker_connected(worker)
        self.scheduler.schedule()

    async def _disconnected(self, conn: Connection) -> None:
        for object_id in list(conn.holding):
            self.objects.release(object_id)
        conn.holding.clear()
        self.actor_director.owner_gone(conn)
        self.placement_groups.owner_gone(conn)
        if conn.role == "driver" and conn.job_id:
            self.recorder.log([Event(K.JOB, conn.job_id, "finished", {})])
        elif conn.role == "worker" and (gone := await self.worker_pool.gone(conn.worker_id or "")):
            handle, exit_code = gone
            self.recorder.log(
                [
                    Event(
                        K.WORKER,
                        handle.worker_id,
                        "died",
                        {"cause": "exited", "exit_code": exit_code},
                        node_id=self.node_id,
                    )
                ]
            )
            if handle.actor_id is not None:
                self.actor_director.worker_lost(handle, exit_code)
                return
            if handle.task is not None:
                self.runs.worker_lost(handle, exit_code)
            if not self._stopping.is_set():
                self.worker_pool.start()
                self.scheduler.schedule()

    def _dispatch(self, conn: Connection, message: object) -> None:
        match message:
            case p.RefCounts(deltas):
                self._ref_counts(conn, deltas)
            case p.RegisterFunction(function_id, blob, name):
                self.tasks.add_function(function_id, blob, name)
            case p.SubmitTask(spec):
                self.runs.submit(conn, spec)
            case p.SubmitDirectCall():
                self.actor_director.submit_direct(conn, message)
            case p.WatchActor(actor_id):
                self.actor_director.watch(conn, actor_id)
            case p.PushObjects(object_ids):
                self.store.push(conn, object_ids)
            case p.PutObject(location, task_id, durable):
                self._hold(conn, location.object_id)
                self.store.put(location, task_id, conn.job_id, durable)
            case p.ReserveShm(request_id, size):
                self.store.reserve(conn, request_id, size)
            case p.GetObjects(request_id, object_ids, timeout):
                self._get(conn, request_id, object_ids, timeout)
            case p.WaitObjects(request_id, object_ids, num_returns, timeout, _fetch):
                self._wait(conn, request_id, object_ids, num_returns, timeout)
            case p.TaskDone():
                self.runs.task_done(self.worker_pool.of(conn), message)
            case p.CancelTask(object_id, force, recursive):
                self.runs.cancel(object_id, force, recursive)
            case p.CreatePlacementGroup():
                self._hold(conn, message.ready_object_id)
                self.placement_groups.create(conn, message)
            case p.RemovePlacementGroup(pg_id):
                self.placement_groups.remove(pg_id)
            case p.PlacementGroupTable():
                self.placement_groups.table(conn, message)
            case p.ReserveActorName():
                self.actor_director.names.reserve(conn, message)
            case p.GetActor():
                self.actor_director.names.get(conn, message)
            case p.KillActor(actor_id, no_restart):
                self.actor_director.kill(actor_id, no_restart)
            case p.ReportLost(object_id, reason):
                self.reconstructor.object_lost(object_id, reason)
            case p.ClusterInfoRequest(request_id):
                conn.send(p.Reply(request_id, self._cluster_info()))
            case p.ClusterNodesRequest(request_id):
                self.remote_tasks.answer_nodes(conn, request_id)
            case _:
                raise p.ProtocolError(f"unexpected message {type(message).__name__}")

    # -- objects -------------------------------------------------------------------

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

    def _get(
        self, conn: Connection, request_id: int, object_ids: list[str], timeout: float | None
    ) -> None:
        handle = self.worker_pool.of(conn)
        waiting = [oid for oid in object_ids if not self.objects.is_ready(oid)]
        if waiting and handle is not None and handle.task is not None and not handle.blocked:
            self.scheduler.block(handle)

        def finish(timed_out: bool) -> None:
            if handle is not None and handle.blocked:
                self.scheduler.unblock(handle)
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

    # -- tasks ---------------------------------------------------------------------

    # -- workers -------------------------------------------------------------------

    def _cluster_info(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "address": self.socket_path,
            "total": dict(self.resources.total),
            "available": dict(self.resources.available),
            "object_store_used": self.objects.used,
            "object_store_capacity": self.objects.capacity,
            "objects": len(self.objects),
            "workers": len(self.worker_pool),
            "pending_tasks": self.scheduler.pending(),
            "waiting_tasks": self.tasks.waiting(),
            "running_tasks": self.worker_pool.running_tasks(),
            "actors": self.actor_director.alive(),
            "pending_actors": self.actor_director.waiting_for_resources(),
            "events_pending": self.recorder.backlog,  # queued, not yet committed
        }


def new_node_id() -> str:
    return uuid.uuid4().hex
