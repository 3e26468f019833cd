"""The nodes this machine runs: the GCS (embedded PostgreSQL, on a head, unless a URL
is given) and a node daemon, started and stopped together.

``sdk.init()`` runs a private single-node cluster. ``cairn start --head`` runs a head
that outlives its drivers, and ``cairn start --address HOST:PORT`` a node that joins it.
Each such node records itself in the temp directory (``cairn-nodes/<pid>.json``, as
Ray's ``session_latest``): ``init(address="auto")`` connects to the recorded head,
``cairn status`` reads it, and ``cairn stop`` stops every recorded node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane import auth, membership, tls
from controlplane.embedded_postgres import ServerTls
from controlplane.errors import GcsIdentityError
from controlplane.eventlog import fencing
from controlplane.gcs_replica import RemoteReplicas, ReplicaPlan
from controlplane.gcs_url import ENV_VAR as GCS_URL_ENV
from controlplane.gcs_url import JOIN_ENV_VAR, JOIN_REPLICA_ENV_VAR, with_query
from controlplane.labels import check_node_labels
from controlplane.node.daemon import new_node_id
from controlplane.node_records import NODE_SOCKET as NODE_SOCKET
from controlplane.node_records import NODES_DIR as NODES_DIR
from controlplane.node_records import NodeRecord as NodeRecord
from controlplane.node_records import find_running as find_running
from controlplane.node_records import local_nodes as local_nodes
from controlplane.node_records import node_log as node_log
from controlplane.node_records import record_node
from controlplane.node_records import running_head as running_head
from controlplane.session_dirs import new_session_dir
from controlplane.settings import env_number
from dataplane import shm

if TYPE_CHECKING:  # (a head's GCS: imported where it is made, so that a joining node
    # or `cairn stop` does not load alembic and SQLAlchemy)
    from controlplane.gcs import Gcs

_DAEMON_START_TIMEOUT_S = 60.0
log = logging.getLogger("cairn")
# the GCS a node is given: a URL, several (one log on those servers), or none (embedded)
GcsUrls = str | Sequence[str] | None
# a node daemon that dies is started again, at most this often
_MAX_RESTARTS, _RESTART_WINDOW_S = 3, 60.0
NODE_ADDRESS = "node.address"
_SCHEDULER = [sys.executable, "-m", "controlplane.scheduler", "--die-with-parent"]
_WEB = [sys.executable, "-m", "controlplane.web", "--die-with-parent"]


def default_object_store_memory() -> int:
    """30% of the machine's memory, as Ray, but no more than /dev/shm can hold."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    shm_free = shutil.disk_usage(shm.SHM_DIR).free
    return int(min(total * 0.3, shm_free * 0.8))


@dataclass
class NodeConfig:
    resources: dict[str, float]
    object_store_memory: int
    labels: dict[str, str] = dataclasses.field(default_factory=dict)  # beside ray.io/node-id


def default_memory(object_store_memory: int) -> int:
    """Ray's ``memory`` resource of a node, unless given: the memory available to
    tasks, which is what the machine has available now less the object store's."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return max(available - object_store_memory, 0)


def node_config(
    num_cpus: float | None,
    num_gpus: float | None,
    resources: dict[str, float] | None,
    object_store_memory: int | None,
    memory: int | None = None,
    labels: dict[str, str] | None = None,
) -> NodeConfig:
    for name, value in (
        ("num_cpus", num_cpus),
        ("num_gpus", num_gpus),
        ("object_store_memory", object_store_memory),
        ("memory", memory),
    ):
        if value is not None and (not isinstance(value, int | float) or value < 0):
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    total: dict[str, float] = {
        "CPU": float(num_cpus if num_cpus is not None else os.cpu_count() or 1),
        "GPU": float(num_gpus or 0),
    }
    for key, amount in (resources or {}).items():
        if key in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(
                f"resources[{key!r}]: give it as num_cpus / num_gpus / memory / "
                "object_store_memory instead"
            )
        total[key] = float(amount)
    store = object_store_memory or default_object_store_memory()
    total["object_store_memory"] = float(store)
    total["memory"] = float(int(memory) if memory is not None else default_memory(store))
    return NodeConfig(total, int(store), check_node_labels(labels or {}, "labels"))


@dataclass
class ClusterRole:
    """How a node takes part in a cluster: None for a private one (sdk.init())."""

    head: bool
    rpc_port: int  # 0: any free port
    rpc_host: str = "127.0.0.1"
    # the cluster token its gRPC service requires and its calls carry; None: auth
    # disabled (loopback only)
    auth_token: str | None = dataclasses.field(default=None, repr=False)
    # TLS between machines (controlplane/tls.py): a head makes the cluster CA; a node
    # that joined brings what the head issued it (see JoinedTls)
    tls: bool = False
    joined_tls: JoinedTls | None = dataclasses.field(default=None, repr=False)
    # the GCS's replicas on another machine (gcs_replica.py): on a head, that machine's
    # address; on the node that joins there, the plans the head answered with (one per
    # server of the log)
    gcs_replica_host: str | None = None
    gcs_replica: list[ReplicaPlan] | None = dataclasses.field(default=None, repr=False)
    # a head's HTTP service (controlplane/web): its port (0: any free one; None: none)
    # and host (None: loopback, as Ray's dashboard: it speaks plain HTTP, so reaching it
    # from other machines is a choice made with --dashboard-host)
    dashboard_port: int | None = None
    dashboard_host: str | None = None


@dataclass(frozen=True)
class JoinedTls:
    """What a joining node got from the head (the CA's certificate and its own) and its
    key; ``gcs``: whether the GCS URL it got wants TLS with that certificate."""

    ca: bytes
    cert: bytes
    key: bytes
    gcs: bool


class LocalNode:
    """The processes of one node on this machine; ``stop()`` ends them and removes what
    they left."""

    def __init__(
        self,
        gcs: Gcs,
        session_dir: Path,
        owns_session_dir: bool,
        config: NodeConfig,
        role: ClusterRole | None,
        on_gcs_event: Callable[[str], None] = log.warning,
        gcs_replica: RemoteReplicas | None = None,
    ) -> None:
        self.gcs = gcs
        self.session_dir = session_dir
        self.config = config
        self.role = role
        self.gcs_replica = gcs_replica  # the head's GCS's replicas, run on this machine
        self._owns_session_dir = owns_session_dir
        self.daemon, self.node_id = self._launch_daemon()
        self._stopping = threading.Event()
        if role is None or role.head:  # one node keeps the log's partitions in shape
            threading.Thread(target=self._partition_upkeep, daemon=True).start()
        if gcs.embedded is not None and gcs.watchdog is None:
            threading.Thread(
                target=self._keep_gcs_running, args=(on_gcs_event,), daemon=True
            ).start()

    def _keep_gcs_running(self, say: Callable[[str], None]) -> None:
        """The embedded server, started again if it stops by itself (see
        ``Gcs.keep_running``: a PANIC on a full disk)."""
        while not self._stopping.wait(0.2):
            try:
                said = self.gcs.keep_running()
            except Exception as exc:  # (never expected) said, and tried again
                said = f"restarting the GCS's PostgreSQL failed: {exc!r}"
            if said:
                with contextlib.suppress(OSError):  # (its disk may be full: said later)
                    say(said)

    def _partition_upkeep(self) -> None:
        """Now and then, with the owner's URL: partitions created ahead of the head (so
        appends do not create them) and the history index built on full ones (so a
        long-running cluster's audits stay fast). A failure is logged and tried again."""
        interval = env_number("CAIRN_PARTITION_UPKEEP_S", 60.0, minimum=0.1)
        while not self._stopping.wait(interval):
            try:
                from controlplane.eventlog.partitions import PartitionManager

                for url in self.gcs.owner_urls:  # (each server of the log: its own)
                    PartitionManager(url).maintain()
            except Exception as exc:  # the GCS may be down a while: next round
                log.warning("partition upkeep failed: %s", exc)

    @property
    def socket_path(self) -> str:
        return str(self.session_dir / NODE_SOCKET)

    @property
    def address(self) -> str | None:
        """HOST:PORT of the node's gRPC service (None in a private cluster)."""
        path = self.session_dir / NODE_ADDRESS
        return path.read_text() if path.exists() else None

    @classmethod
    def start(
        cls,
        *,
        gcs_url: GcsUrls,
        config: NodeConfig,
        role: ClusterRole | None = None,
        gcs_replicas: int = 0,
        on_gcs_event: Callable[[str], None] = log.warning,
    ) -> LocalNode:
        """``gcs_replicas``: 1 for a synchronous replica of the embedded GCS that a
        watchdog promotes when the primary is gone (``on_gcs_event`` hears of it)."""
        from controlplane.gcs import Gcs

        session_dir = new_session_dir()
        gcs: Gcs | None = None
        replica: RemoteReplicas | None = None
        try:
            gcs_url, listen_host, server_tls = _tls_for(role, session_dir, gcs_url)
            node_tls = tls.NodeTls.find(session_dir)
            gcs = Gcs(
                gcs_url,
                session_dir=session_dir,
                listen_host=listen_host,
                server_tls=server_tls,
                replicas=gcs_replicas,
                replica_host=role.gcs_replica_host if role else None,
                node_tls=node_tls,
                on_event=on_gcs_event,
            )
            gcs.start()
            if role is not None and role.gcs_replica is not None:
                if node_tls is None:
                    raise ValueError("a GCS replica on this machine needs TLS (as its head)")
                replica = RemoteReplicas(
                    role.gcs_replica, session_dir, node_tls, on_event=on_gcs_event
                ).start()
            return cls(gcs, session_dir, True, config, role, on_gcs_event, replica)
        except BaseException:
            if replica is not None:
                replica.stop()
            if gcs is not None:
                gcs.stop()
            shutil.rmtree(session_dir, ignore_errors=True)
            raise

    def _launch_daemon(
        self, adopt_store_of: str | None = None
    ) -> tuple[subprocess.Popen[bytes], str]:
        node_id = new_node_id()
        command = [
            sys.executable,
            "-m",
            "controlplane.node",
            "--session-dir",
            str(self.session_dir),
            "--node-id",
            node_id,
            "--resources",
            json.dumps(self.config.resources),
            "--object-store-memory",
            str(self.config.object_store_memory),
            "--labels",
            json.dumps(self.config.labels),
            "--die-with-parent",
        ]
        command += ["--adopt-store-of", adopt_store_of] if adopt_store_of else []
        # secrets go in the environment: argv is readable by every user of the machine
        env = {k: v for k, v in os.environ.items() if k != auth.TOKEN_ENV}
        env[GCS_URL_ENV] = self.gcs.url
        if self.role is not None:
            command += ["--rpc-port", str(self.role.rpc_port), "--rpc-host", self.role.rpc_host]
            command += ["--head"] if self.role.head else []
            if self.role.auth_token is None:
                command += ["--disable-auth"]
            else:  # in the environment: argv is readable by every user
                env[auth.TOKEN_ENV] = self.role.auth_token
                auth.write_token(self.session_dir, self.role.auth_token)
            if self.role.head:  # what the head hands a node that joins
                env[JOIN_ENV_VAR] = self.gcs.cluster_url
                command += ["--join-gcs-tls"] if self.gcs.cluster_tls else []
                if self.gcs.replica_plans:
                    env[JOIN_REPLICA_ENV_VAR] = json.dumps(
                        [plan.to_dict() for plan in self.gcs.replica_plans]
                    )
            if self.gcs_replica is not None:  # it outlives the head's machine: so must this
                command += ["--membership-monitor"]
        daemon: subprocess.Popen[bytes] | None = None
        try:
            daemon = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env)
            _wait_ready(daemon, self.session_dir)
        except BaseException:
            if daemon is not None:
                with contextlib.suppress(Exception):
                    daemon.kill()
                    daemon.wait()
            shm.unlink_all(node_id)
            raise
        finally:
            if adopt_store_of:  # what it did not take over (or all, if it failed)
                shm.unlink_all(adopt_store_of)
        return daemon, node_id

    def restart_daemon(self) -> None:
        """A new node daemon in place of one that died (its workers died with it): it
        joins under a new id, as the cluster expects of a restarted node, and what the
        old one was doing is retried or rebuilt from the log by the nodes that own it
        -- but for the objects it kept for them, which the new daemon adopts, at the
        same address (controlplane/node/store_adoption.py), if this process declares
        the old id dead before the monitor does."""
        self.daemon.wait()
        address = self.address
        adopt_store_of = None
        if self.role is not None and address is not None:  # same port: same address
            self.role = dataclasses.replace(self.role, rpc_port=int(address.rsplit(":", 1)[1]))
            if self._declare_restarted():
                adopt_store_of = self.node_id
        if adopt_store_of is None:
            shm.unlink_all(self.node_id)
        for name in (NODE_SOCKET, NODE_ADDRESS, "node.ready"):
            (self.session_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.session_dir / "spill", ignore_errors=True)
        self.daemon, self.node_id = self._launch_daemon(adopt_store_of)

    def _declare_restarted(self) -> bool:
        try:
            return asyncio.run(membership.declare_restarted(self.gcs.url, self.node_id))
        except Exception as exc:  # the GCS is away: the monitor will declare it
            log.warning("node %s: could not declare its daemon restarted: %r", self.node_id, exc)
            return False

    def stop(self) -> None:
        self._stopping.set()
        if self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(15)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        shm.unlink_all(self.node_id)
        if self.gcs_replica is not None:
            self.gcs_replica.stop()
        self.gcs.stop()
        if self._owns_session_dir:
            shutil.rmtree(self.session_dir, ignore_errors=True)


def _spoken(announce: Callable[[str], None]) -> Callable[[str], None]:
    """``announce`` that survives a full disk under the node's output (the session's
    disk may be the GCS's): the text stays buffered and is written once there is room,
    and the node goes on rather than die of what it tells."""

    def say(text: str) -> None:
        with contextlib.suppress(OSError):
            announce(text)

    return say


def _start_scheduler(gcs_url: str, session_dir: Path) -> subprocess.Popen[bytes]:
    """A global scheduler for the log at ``gcs_url`` (given in its environment), which
    holds it to the log the head's daemon saw (its session's ``gcs_identity.json``)."""
    env = {
        **os.environ,
        GCS_URL_ENV: gcs_url,
        fencing.IDENTITY_FILE_ENV: str(session_dir / fencing.IDENTITY_FILE),
    }
    return subprocess.Popen(_SCHEDULER, stdin=subprocess.DEVNULL, env=env)


def _start_web(gcs_url: str, session_dir: Path, role: ClusterRole) -> subprocess.Popen[bytes]:
    """The head's HTTP service (controlplane/web): dashboard, jobs, metrics."""
    env = {k: v for k, v in os.environ.items() if k != auth.TOKEN_ENV}
    env[GCS_URL_ENV] = gcs_url
    if role.auth_token is not None:
        env[auth.TOKEN_ENV] = role.auth_token
    host = role.dashboard_host or "127.0.0.1"
    command = [*_WEB, "--host", host, "--port", str(role.dashboard_port)]
    command += ["--session-dir", str(session_dir)]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env)


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    child.terminate()
    try:
        child.wait(10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def run_node(
    gcs_url: GcsUrls,
    config: NodeConfig,
    role: ClusterRole,
    announce: Callable[[str], None],
    cluster: str | None = None,
    gcs_replicas: int = 0,
) -> None:
    """Runs a node in this process until SIGTERM/SIGINT (`cairn stop`, Ctrl-C) or until
    its node daemon exits (e.g. the cluster declared it dead); then stops it. A head
    with ``gcs_replicas`` runs the GCS's replica and its watchdog here too. A daemon
    that refused the GCS (wiped, replaced, put back from an older copy) is not started
    again: the node stops and GcsIdentityError says why."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    announce = _spoken(announce)
    node = LocalNode.start(
        gcs_url=gcs_url,
        config=config,
        role=role,
        gcs_replicas=gcs_replicas,
        on_gcs_event=announce,
    )
    record = None
    scheduler: subprocess.Popen[bytes] | None = None
    web: subprocess.Popen[bytes] | None = None
    refused: str | None = None
    try:
        if role.head:  # the head runs a global scheduler (any number may run)
            scheduler = _start_scheduler(node.gcs.url, node.session_dir)
            if role.dashboard_port is not None:
                web = _start_web(node.gcs.url, node.session_dir, role)
        record = record_node(node.session_dir, node.address, role.head, cluster)
        kind = "head node" if role.head else "node"
        announce(f"{kind} {node.node_id} is running at {node.address} ({node.session_dir})")
        restarts: list[float] = []
        web_starts: list[float] = []
        while not stopping.wait(0.2):
            if node.daemon.poll() is not None:
                announce(f"the node daemon exited with code {node.daemon.returncode}")
                if node.daemon.returncode == fencing.GCS_REFUSED_EXIT:
                    refused = fencing.refusal(node.session_dir) or "(no reason left)"
                    announce("it refused the GCS; this node stops (another daemon would too)")
                    break
                recent = [t for t in restarts if time.monotonic() - t < _RESTART_WINDOW_S]
                if len(recent) >= _MAX_RESTARTS or stopping.is_set():
                    break  # it keeps dying: stop rather than loop
                restarts = [*recent, time.monotonic()]
                try:
                    node.restart_daemon()
                except GcsIdentityError as error:  # what the old one saw: not this log
                    refused = str(error)
                    announce("the new daemon refused the GCS; this node stops")
                    break
                except RuntimeError as error:  # it died starting: one more death
                    announce(f"the new node daemon failed to start: {error}")
                    continue
                record = record_node(node.session_dir, node.address, role.head, cluster)
                announce(f"a new node daemon {node.node_id} runs in its place")
            if scheduler is None and node.gcs_replica is not None and node.gcs_replica.promoted:
                # the head's machine is gone: its global scheduler with it
                announce("the GCS failed over to this machine: running a global scheduler")
                scheduler = _start_scheduler(node.gcs.url, node.session_dir)
            if scheduler is not None and scheduler.poll() is not None:
                if scheduler.returncode == fencing.GCS_REFUSED_EXIT:
                    # not the log it followed: the daemon will refuse it too, and stop
                    announce("the global scheduler refused the GCS; not restarting it")
                    scheduler = None
                    continue
                # it keeps no state: a new one resumes from the log
                announce(f"the global scheduler exited ({scheduler.returncode}); restarting it")
                scheduler = _start_scheduler(node.gcs.url, node.session_dir)
            if web is not None and web.poll() is not None:  # (its output says why)
                # it supervises the jobs: a new one marks those it left running failed
                # (their drivers died with it) and takes new ones (controlplane/jobs.py)
                web_starts = [t for t in web_starts if time.monotonic() - t < _RESTART_WINDOW_S]
                if len(web_starts) >= _MAX_RESTARTS:  # it keeps dying: leave it
                    announce(f"the HTTP service (dashboard) exited ({web.returncode})")
                    web = None
                    continue
                announce(f"the HTTP service (dashboard) exited ({web.returncode}); restarting it")
                web = _start_web(node.gcs.url, node.session_dir, role)
                web_starts.append(time.monotonic())
    finally:
        if record is not None:
            record.unlink(missing_ok=True)
        for child in (scheduler, web):
            if child is not None:
                _stop_child(child)
        node.stop()
    if refused is not None:
        raise GcsIdentityError(refused)
    if record is not None:  # a background node stopped cleanly: its output file goes too
        node_log(os.getpid()).unlink(missing_ok=True)


def start_in_background(
    gcs_url: GcsUrls,
    config: NodeConfig,
    role: ClusterRole,
    join_address: str | None,
    gcs_replicas: int = 0,
) -> NodeRecord:
    """Starts ``cairn start --block`` (``run_node``) in a new session, so that it
    outlives this process, and waits until its node is running; its output goes to a
    log file in the temp directory, removed once the node runs."""
    command = [sys.executable, "-m", "controlplane.cli", "start", "--block"]
    command += ["--node-config", json.dumps(asdict(config)), "--port", str(role.rpc_port)]
    command += ["--node-ip-address", role.rpc_host, "--tls", "on" if role.tls else "off"]
    env = {k: v for k, v in os.environ.items() if k != auth.TOKEN_ENV}
    if role.auth_token is None:
        command += ["--disable-auth"]
    else:
        env[auth.TOKEN_ENV] = role.auth_token
    if join_address is not None:
        command += ["--address", join_address]
        command += ["--gcs-replica"] if role.gcs_replica is not None else []
    else:
        command += ["--head", "--gcs-replicas", str(gcs_replicas)]
        if role.gcs_replica_host is not None:
            command += ["--gcs-replica-host", role.gcs_replica_host]
        if role.dashboard_port is None:
            command += ["--no-include-dashboard"]
        else:
            command += ["--dashboard-port", str(role.dashboard_port)]
            if role.dashboard_host is not None:
                command += ["--dashboard-host", role.dashboard_host]
        if gcs_url is not None:  # (several: whitespace never is part of a URL)
            env[GCS_URL_ENV] = gcs_url if isinstance(gcs_url, str) else " ".join(gcs_url)
    starting = Path(tempfile.gettempdir()) / f"cairn-node-{time.time_ns()}.log"
    with open(starting, "wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=env,
        )
    log_path = node_log(process.pid)
    starting.replace(log_path)  # the node keeps writing to it under its new name
    deadline = time.monotonic() + _DAEMON_START_TIMEOUT_S * 2
    while True:
        node = next((n for n in local_nodes() if n.pid == process.pid), None)
        if node is not None and node.running:
            return node
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the node did not start; its output ({log_path}):\n{tail}")
        time.sleep(0.05)


def _tls_for(
    role: ClusterRole | None, session_dir: Path, gcs_url: GcsUrls
) -> tuple[GcsUrls, str | None, ServerTls | None]:
    """Puts a node's TLS material in its session directory: a head with TLS makes the
    cluster CA and issues its own and the embedded PostgreSQL's certificates; a node
    that joined stores what the head issued it. Returns the GCS URL to use, and for a
    head's embedded server, the address to serve other machines on (None: loopback
    only) and its TLS."""
    if role is None:
        return gcs_url, None, None
    listen_host = None if auth.is_loopback(role.rpc_host) or gcs_url else role.rpc_host
    if role.joined_tls is not None:
        joined = role.joined_tls
        node_tls = tls.NodeTls.write(session_dir, joined.ca, joined.cert, joined.key)
        if joined.gcs and isinstance(gcs_url, str):
            gcs_url = with_query(gcs_url, node_tls.postgres_params())
        return gcs_url, None, None
    if not (role.head and role.tls):
        return gcs_url, listen_host, None
    hosts = [role.rpc_host, "127.0.0.1", "localhost"]
    _node_tls, authority = tls.NodeTls.make_head(session_dir, hosts)
    server_key = tls.new_key()
    server_cert = authority.issue(server_key.public_key(), "cairn gcs", hosts, client=False)
    server_tls = ServerTls(server_cert, tls.key_pem(server_key), authority.certificate)
    return gcs_url, listen_host, server_tls if listen_host else None


def _wait_ready(daemon: subprocess.Popen[bytes], session_dir: Path) -> None:
    deadline = time.monotonic() + _DAEMON_START_TIMEOUT_S
    ready = session_dir / "node.ready"
    while not ready.exists():
        if daemon.poll() is not None:
            if daemon.returncode == fencing.GCS_REFUSED_EXIT:  # (a daemon started anew)
                raise GcsIdentityError(fencing.refusal(session_dir) or "it refused the GCS")
            raise RuntimeError(f"the node daemon exited with code {daemon.returncode} on start")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node daemon did not start within {_DAEMON_START_TIMEOUT_S}s")
        time.sleep(0.01)
