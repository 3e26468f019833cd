"""A node's link to the rest of its cluster: its gRPC service (``cairn.Node``, TLS and
the token), its liveness pings and load heartbeats, the membership monitor where it
runs one, the head's answer to nodes that join, and who the other nodes are (alive,
dead) as the log says. Only this part changes the membership it keeps; the node's log
follower tells it of nodes registered and dead."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from controlplane import auth
from controlplane.eventlog import EntityKind, Event, RecordedEvent, log_head_positions
from controlplane.eventlog.connection import retry_while_unavailable
from controlplane.membership import (
    HEARTBEAT_MIN_INTERVAL_S,
    LivenessPinger,
    MembershipMonitor,
    cluster_nodes,
)
from controlplane.node import rpc
from controlplane.node.recorder import EventRecorder
from controlplane.tls import NodeTls

K = EntityKind
T = TypeVar("T")
_LOAD_KEYS = (
    "running_tasks",
    "pending_tasks",
    "waiting_tasks",
    "actors",
    "workers",
    "object_store_used",
)


@dataclass(frozen=True)
class JoinOffer:
    """What the head hands a node that joins: the GCS URL it reaches (and whether with
    TLS), and the plan of the GCS replica for the node on its host that asks."""

    gcs_url: str
    gcs_tls: bool
    gcs_replica: list[dict[str, Any]] | None = None  # one plan per server of the log


class ClusterLink:
    def __init__(
        self,
        node_id: str,
        gcs_url: str,
        host: str,
        port: int,
        recorder: EventRecorder,
        *,
        auth_token: str | None,
        tls: NodeTls | None,
        join_offer: JoinOffer | None,
        membership_monitor: bool,
        spawn: Callable[..., asyncio.Task[Any]],
        on_fenced: Callable[[], None],
    ) -> None:
        """``join_offer``: on the head (it answers ``Join``); ``membership_monitor``:
        this node declares silent nodes dead too; ``spawn(coroutine, vital=...)`` runs
        the link's loops; ``on_fenced()``: the cluster declared this node dead."""
        self.node_id = node_id
        self.gcs_url = gcs_url
        self.host, self._port = host, port
        self.recorder = recorder
        self.auth_token = auth_token  # None: calls are not checked (--disable-auth)
        self.tls = tls
        self._join_offer = join_offer
        self._monitors = membership_monitor
        self._spawn = spawn
        self._on_fenced = on_fenced
        self.address = ""  # host:port of the gRPC service, once it listens
        self._server: grpc.aio.Server | None = None
        self._pinger: LivenessPinger | None = None
        self.ping_task: asyncio.Task[None] | None = None  # runs until the node leaves
        self._monitor: MembershipMonitor | None = None
        self._peers: set[str] = set()  # other nodes alive, from the log
        self._dead: set[str] = set()  # declared dead: their calls are refused
        self._addresses: dict[str, str] = {}  # every node seen alive: its address
        self._stale_logged: dict[str, float] = {}

    # -- membership ------------------------------------------------------------------

    def has_peers(self) -> bool:
        return bool(self._peers)

    def peer_addresses(self) -> list[str]:
        """The addresses of the other nodes alive."""
        return [self._addresses[n] for n in self._peers if n in self._addresses]

    def address_of(self, node_id: str) -> str | None:
        """The address of a node seen alive (now or before it died)."""
        return self._addresses.get(node_id)

    def is_dead_peer(self, node_id: str) -> bool:
        """Whether a node seen alive here has died since."""
        return node_id in self._addresses and node_id not in self._peers

    def node_event(self, event: RecordedEvent) -> bool:
        """Another node's ``registered`` or ``dead`` event; True if it says a node died."""
        if event.entity_id == self.node_id:
            return False
        if event.event_type == "registered":
            self._peers.add(event.entity_id)
            self._addresses[event.entity_id] = event.payload["address"]
        elif event.event_type == "dead":
            self._peers.discard(event.entity_id)
            self._dead.add(event.entity_id)
            return True
        return False

    # -- joining ---------------------------------------------------------------------

    async def join(
        self,
        handlers: dict[str, rpc.Handler],
        raw_handlers: dict[str, rpc.RawHandler],
        load: Callable[[], dict[str, Any]],
    ) -> list[int]:
        """Serves the node's gRPC service with ``handlers``, starts the liveness pings,
        the load heartbeats (of ``load()``) and the monitor, and reads who is in the
        cluster; returns the log's head positions then (the follower starts after them)."""
        if self._join_offer is not None:
            handlers = {**handlers, "Join": self._join_answer}
        rpc.use_token(self.auth_token)
        rpc.use_tls(self.tls)
        rpc.use_node_id(self.node_id)
        self._server, port = await rpc.serve(
            self.host,
            self._port,
            handlers,
            raw_handlers,
            token=self.auth_token,
            on_refused=self._auth_refused,
            node_tls=self.tls,
            stale_check=rpc.StaleCheck(self._dead.__contains__, self._stale_refused),
        )
        self.address = f"{self.host}:{port}"
        self._pinger = LivenessPinger(self.gcs_url, self.node_id, self.address, self._on_fenced)
        # each read or write of the join rides out a GCS that restarts meanwhile
        await self._while_unavailable(self._pinger.register)
        self.ping_task = self._spawn(self._pinger.run(), vital=True)
        self._spawn(self._heartbeats(load), vital=True)
        after = await self._while_unavailable(self._log_head)
        members = await self._while_unavailable(lambda: cluster_nodes(self.gcs_url))
        alive = [n for n in members if n["state"] == "ALIVE" and n["node_id"] != self.node_id]
        self._dead.update(n["node_id"] for n in members if n["state"] != "ALIVE")
        self._peers = {n["node_id"] for n in alive}
        self._addresses = {n["node_id"]: n["address"] for n in alive}
        if self._monitors:
            self._monitor = MembershipMonitor(self.gcs_url)
            self._spawn(self._monitor.run(), vital=True)
        return after

    def _join_answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """What a node joining needs (the caller holds the token: it got this far): the
        GCS URL and, with TLS, a certificate for its key, signed by the cluster CA."""
        offer = self._join_offer
        assert offer is not None
        answer: dict[str, Any] = {
            "gcs_url": offer.gcs_url,
            "head_node_id": self.node_id,
            "auth": self.auth_token is not None,  # the joiner must do as the head
            "tls": self.tls is not None,
            "gcs_tls": offer.gcs_tls,
        }
        authority = self.tls.authority() if self.tls is not None else None
        hosts = [str(h) for h in request.get("hosts", [])][:8]
        if authority is not None and request.get("csr"):
            cert = authority.issue_for_request(str(request["csr"]).encode(), "cairn node", hosts)
            answer |= {"ca": authority.certificate.decode(), "cert": cert.decode()}
        if request.get("gcs_replica"):
            plans = offer.gcs_replica
            if not plans:
                answer["gcs_replica_refused"] = (
                    "this head plans no GCS replica on another machine: start it with "
                    "--gcs-replicas 1 --gcs-replica-host HOST"
                )
            elif plans[0]["host"] not in hosts:
                answer["gcs_replica_refused"] = (
                    f"this head plans its GCS replica on {plans[0]['host']}, not on "
                    f"{', '.join(hosts)}"
                )
            else:
                answer["gcs_replica"] = plans
        return answer

    def _stale_refused(self, node_id: str, method: str, peer: str) -> None:
        """A call from a node declared dead was refused: logged, at most once per node
        per refusal interval (a stale node retrying must not flood the log)."""
        now = time.monotonic()
        if now - self._stale_logged.get(node_id, float("-inf")) < auth.REFUSAL_LOG_INTERVAL_S:
            return
        self._stale_logged[node_id] = now
        payload = {
            "reason": f"a call from node {node_id}, which was declared dead",
            "method": method,
            "peer": peer,
            "from_node": node_id,
        }
        self.recorder.log([Event(K.NODE, node_id, "stale_refused", payload, node_id=self.node_id)])

    def _auth_refused(self, method: str, peer: str) -> None:
        """A call without the cluster token leaves this event and nothing else."""
        payload = {"method": method, "peer": peer}
        self.recorder.log(
            [Event(K.NODE, self.node_id, "auth_refused", payload, node_id=self.node_id)]
        )

    async def _heartbeats(self, load: Callable[[], dict[str, Any]]) -> None:
        """Logs the node's load when it changed, at most once per interval."""
        last: dict[str, Any] | None = None
        while True:
            await asyncio.sleep(HEARTBEAT_MIN_INTERVAL_S)
            info = load()
            now = {"available": info["available"], "load": {k: info[k] for k in _LOAD_KEYS}}
            if now != last:
                self.recorder.log(
                    [Event(K.NODE, self.node_id, "heartbeat", now, node_id=self.node_id)]
                )
                last = now

    async def _while_unavailable(self, attempt: Callable[[], Awaitable[T]]) -> T:
        return await retry_while_unavailable(
            self.gcs_url, attempt, timeout=self.recorder.unavailable_timeout
        )

    async def _log_head(self) -> list[int]:
        return await log_head_positions(self.gcs_url, away_ok=True)

    async def leave(self, dead: Event) -> None:
        """Stops pinging and ends the node's liveness together with its ``dead`` event,
        then stops the monitor and the service."""
        if self.ping_task is not None:
            self.ping_task.cancel()
            await asyncio.wait([self.ping_task])
        if self._pinger is not None:
            await self._pinger.leave(dead)
        if self._monitor is not None:
            await self._monitor.close()
        if self._server is not None:
            await self._server.stop(grace=1)
            await rpc.close_channels()
