"""The node daemon: one per node. It makes the node's parts (parts.py;
controlplane/README.md, "The node daemon's parts"), serves its clients (clients.py,
which routes their messages to the parts), joins the cluster, and stops -- cleanly, or
for a reason its clients are told. Every transition is recorded in the log through the
one event recorder.

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
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from controlplane.errors import GcsError, GcsIdentityError
from controlplane.eventlog import EVERY_NODE, EntityKind, Event
from controlplane.eventlog.connection import retry_while_unavailable
from controlplane.labels import node_labels
from controlplane.node import metrics as node_metrics
from controlplane.node.clients import Clients
from controlplane.node.cluster_link import JoinOffer
from controlplane.node.log_files import read_log_handler
from controlplane.node.parts import ClusterOptions, build_parts
from controlplane.node.resources import ResourcePool, node_resources
from controlplane.node.store_adoption import Adopted, adopt, objects_left
from controlplane.settings import env_number
from dataplane import protocol as p
from dataplane import shm
from dataplane.transfer import object_service

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
        labels: dict[str, str] | None = None,
        rpc_port: int | None = None,
        rpc_host: str = "127.0.0.1",
        head: bool = False,
        auth_token: str | None = None,
        join_gcs: tuple[str, bool] | None = None,
        join_gcs_replica: list[dict[str, Any]] | None = None,
        membership_monitor: bool = False,
        adopt_store_of: str | None = None,
    ) -> None:
        self.session_dir = session_dir
        # the id of this node's previous daemon, whose store this one adopts
        self.adopt_store_of = adopt_store_of
        shm.map_lazily()  # (its event loop must not stall mapping a large region)
        # In a cluster (rpc_port given; 0: any free port): the gRPC service, liveness
        # pings and load heartbeats; the head also lets nodes join and declares silent
        # ones dead. A private single-node cluster (sdk.init()) has none of these.
        self.rpc_port = rpc_port
        self.head = head
        self.socket_path = str(session_dir / "node.sock")
        self.gcs_url = gcs_url
        self.node_id = node_id
        cluster = None
        if rpc_port is not None:
            join_offer = JoinOffer(*(join_gcs or (gcs_url, False)), join_gcs_replica)
            cluster = ClusterOptions(
                rpc_host,
                rpc_port,
                auth_token,
                join_offer if head else None,
                head or membership_monitor,
            )
        # with Ray's node:<ip> (and, on the head or a private cluster's one node,
        # node:__internal_head__), which tasks ask for to run on that node
        own = node_resources(rpc_host, head=head or rpc_port is None)
        self.parts = build_parts(
            node_id=node_id,
            gcs_url=gcs_url,
            session_dir=session_dir,
            socket_path=self.socket_path,
            resources=ResourcePool({**resources, **own}),
            labels=node_labels(node_id, labels),
            workers=max(1, int(resources.get("CPU", 1))),
            object_store_memory=object_store_memory,
            durable_dir=Path(os.environ.get("CAIRN_DURABLE_DIR") or session_dir / "durable"),
            head=head,
            cluster=cluster,
            spawn=self._spawn,
            stop_because=self._stop_because,
        )
        self.recorder = self.parts.recorder
        self.link = self.parts.link
        # the GCS is not this node's log any more (wiped, replaced, put back from an
        # older copy): the daemon stops, saying why (see eventlog/fencing.py)
        self.refused: GcsIdentityError | None = None
        self.recorder.on_refused(self._gcs_refused)
        self._stopping = asyncio.Event()
        self.clients = Clients(self.parts, session_dir, gcs_url, self._stopping)
        self._server: asyncio.AbstractServer | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # -- lifecycle -----------------------------------------------------------------

    async def serve(self) -> None:
        # a daemon started while PostgreSQL restarts (after a crash of both) waits for it
        await self._while_unavailable(self.recorder.start)
        adopted = await self._adopt_store() if self.adopt_store_of else None
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
                        "resources": self.parts.resources.total,
                        "labels": self.parts.labels,
                        "socket": self.socket_path,
                        "head": self.head,
                        "hostname": os.uname().nodename,
                        "to_node": EVERY_NODE,
                    },
                    node_id=self.node_id,
                )
            ]
        )
        if adopted is not None:
            self.recorder.log(adopted.events)
        listening = p.bind_private_socket(self.socket_path)  # the driver socket, 0600
        self._server = await asyncio.start_unix_server(self.clients.serve, sock=listening)
        self.parts.worker_pool.fill()
        # (Ray's idle_worker_killing_time_threshold_ms is a second too)
        idle_for = env_number("CAIRN_IDLE_WORKER_TIMEOUT_S", 1.0, minimum=0.0)
        self._spawn(self.clients.reap_workers(idle_for))
        self._spawn(self.parts.worker_pool.output.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        (self.session_dir / "node.ready").write_text(self.node_id)
        await self._stopping.wait()
        await self._shutdown()

    async def _adopt_store(self) -> Adopted:
        """The objects the previous daemon kept for other nodes, taken over before any
        of them can ask (controlplane/node/store_adoption.py)."""
        old = self.adopt_store_of or ""
        left = await self._while_unavailable(lambda: objects_left(self.gcs_url, old))
        store = self.parts.store
        kept = self.parts.remote_tasks.kept_for_owner
        adopted = adopt(self.node_id, old, left, store.memory, store.objects, kept)
        log.warning(
            "node daemon %s adopted %d objects (%d bytes) of %s's store",
            self.node_id,
            len(adopted.locations),
            sum(at.size for at in adopted.locations),
            old,
        )
        return adopted

    async def _join_cluster(self) -> None:
        """Joins the cluster (controlplane/node/cluster_link.py), then follows the log
        from where it stood then."""
        assert self.link is not None
        object_info, read_object = object_service(self.parts.store.memory, self.parts.store.job_of)
        self.recorder.on_fenced(self._fenced)
        after = await self.link.join(
            {
                "Info": lambda _request: self.parts.info(),
                "Release": self.parts.remote_tasks.owner_released,
                "ObjectInfo": object_info,
                "Output": self.parts.worker_pool.output.received,
                "FlushOutput": self.parts.worker_pool.output.flush_requested,
                "MemorySummary": lambda _request: self.parts.memory_summary(),
                "Metrics": lambda _request: node_metrics.snapshot(self.parts),
                "ReadLog": read_log_handler(self.parts.worker_pool.output.logs_dir),
            },
            {"ReadObject": read_object},
            self.parts.info,
        )
        (self.session_dir / "node.address").write_text(self.link.address)
        self._spawn(self.parts.remote_tasks.follow_log(after), vital=True)

    @property
    def address(self) -> str:
        """host:port of the node's gRPC service ("" outside a cluster, or before)."""
        return self.parts.remote_tasks.address

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
        self.clients.tell_all(p.Shutdown(f"the node daemon stopped: {reason}"))
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
        await self.parts.worker_pool.stop()
        dead = Event(
            K.NODE,
            self.node_id,
            "dead",
            {"cause": "shutdown", "to_node": EVERY_NODE},
            node_id=self.node_id,
        )
        if self.link is None:
            self.recorder.log([dead])
        await self.recorder.close()
        if self.link is not None:
            await self.link.leave(dead)
        shm.unlink_all(self.node_id)


def new_node_id() -> str:
    return uuid.uuid4().hex
