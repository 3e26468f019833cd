"""Opening the GCS for a session: the PostgreSQL named by URL (argument or
``$CAIRN_GCS_URL``), or else a private embedded server; either way migrated to head.

Two URLs come out (see SECURITY.md, "Database roles"): ``owner_url`` migrates and
maintains the schema, ``url`` is what the runtime (node daemons, schedulers, drivers)
connects with. On the embedded server they differ: the superuser owns the schema, the
runtime logs in as ``cairn_runtime`` (appends and reads, no DDL). A URL given is used
for both, with its own user, as given: give the runtime a ``cairn_runtime`` login and
run ``cairn migrate`` with an owner's URL first.

With ``replicas=1`` (``cairn start --head --gcs-replicas 1``) the embedded server gets a
synchronous streaming replica and a watchdog that promotes it when the primary is gone
(``failover.py``); both URLs then name both servers, with
``target_session_attrs=read-write``, so every process follows the primary. A log on
several embedded servers gets a replica and a watchdog per server, each failing over on
its own; server 0's ``log_servers`` names both of each server, so every process follows
each server's primary too."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import psycopg

from controlplane import schema, settings
from controlplane.embedded_postgres import EmbeddedPostgres, ServerTls
from controlplane.errors import EmbeddedPostgresError, GcsUnavailableError
from controlplane.eventlog.partitions import PartitionManager
from controlplane.failover import RemoteStandbyWatch, Watchdog
from controlplane.gcs_replica import ReplicaPlan
from controlplane.gcs_url import normalize, redact, resolve_gcs_url, with_hosts, with_query
from controlplane.log_servers import address_of, place_log
from controlplane.postgres_tunnel import PostgresTlsTunnel
from controlplane.tls import NodeTls

DEFAULT_CONNECT_TIMEOUT_S = 5
MAX_REPLICAS = 1
RESTART_EVERY_S = 2.0  # how often a stopped embedded server is tried again
REPLICA_DIR = "replica"  # in the session directory: the replica's data and log
LOG_SERVER_DIR = "log-server-{}"  # ... and each other server's of a log on several
log = logging.getLogger("cairn.gcs")


def check_reachable(url: str, timeout: int = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Fails fast, naming the URL (password hidden), if PostgreSQL does not answer."""
    try:
        with psycopg.connect(url, connect_timeout=timeout) as conn:
            version = conn.info.server_version
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise GcsUnavailableError(f"cannot reach the GCS at {redact(url)}: {reason}") from exc
    if version < 150000:
        raise GcsUnavailableError(
            f"the GCS at {redact(url)} runs PostgreSQL {version // 10000}; Cairn needs 15 or newer"
        )


def check_replicas(replicas: int, *, external: bool) -> None:
    """Refuses a number of replicas this GCS cannot run, saying why."""
    if replicas < 0 or replicas > MAX_REPLICAS:
        raise ValueError(
            f"--gcs-replicas must be 0 or {MAX_REPLICAS}, got {replicas}: one synchronous "
            "replica is what the watchdog can fail over to for now"
        )
    if replicas and external:
        raise ValueError(
            "--gcs-replicas runs replicas of the embedded GCS; a PostgreSQL given by URL "
            "(--gcs-url) keeps its own replicas and failover (give its hosts in one URL "
            "with target_session_attrs=read-write)"
        )


def _requested(url: str | Sequence[str] | None) -> list[str]:
    """The URLs given (a string: one, else ``$CAIRN_GCS_URL``), normalized; none: the
    embedded server."""
    if url is None or isinstance(url, str):
        one = resolve_gcs_url(url)
        return [one] if one else []
    return [normalize(given) for given in url]


def check_log_servers(urls: Sequence[str], embedded: int) -> int:
    """How many servers the log lies on, or ValueError saying what cannot be."""
    if embedded < 1:
        raise ValueError(f"--log-servers must be 1 or more, got {embedded}")
    if urls and embedded > 1:
        raise ValueError(
            "--log-servers starts embedded servers; a log on servers given by URL names "
            "each with its own --gcs-url"
        )
    count = len(urls) or embedded
    logins = {(urlsplit(url).username, urlsplit(url).password) for url in urls}
    if len(logins) > 1:
        raise ValueError(
            "the --gcs-url of a log on several servers must all name the same login "
            "(user and password): every process logs in to each server with server 0's"
        )
    return count


def _made(directory: Path) -> Path:
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


def _following(url: str, servers: Sequence[EmbeddedPostgres]) -> str:
    """``url`` naming each of ``servers`` on loopback, for whichever takes writes (a
    primary and its replica: every process follows a failover)."""
    entries = [f"127.0.0.1:{server.port}" for server in servers]
    return with_query(with_hosts(url, entries), {"target_session_attrs": "read-write"})


# where this machine's processes reach a replica on another machine: a tunnel at this
# loopback address, on its primary's port (Gcs._plan_remote_replica)
TUNNEL_HOST = "127.0.0.2"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Gcs:
    """``with Gcs() as gcs: gcs.url`` -- a migrated log, embedded unless a URL is given."""

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        session_dir: Path | None = None,
        listen_host: str | None = None,
        server_tls: ServerTls | None = None,
        replicas: int = 0,
        replica_host: str | None = None,
        node_tls: NodeTls | None = None,
        on_event: Callable[[str], None] = log.warning,
        log_shards: int | None = None,
        log_servers: int | None = None,
    ) -> None:
        """An embedded server keeps its data in ``session_dir`` (a new one if None) and
        serves other machines at ``listen_host`` (with ``server_tls``) if given;
        ``replicas``: 0, or 1 for a synchronous replica with automatic failover (the
        embedded server only), on this machine, or with ``replica_host`` on that one
        (``gcs_replica.py``; reached with the head's ``node_tls``); ``on_event`` hears
        the watchdogs' failovers; ``log_shards``: how many shards the log has from now
        on (None: ``$CAIRN_LOG_SHARDS``, else as it is; see migrations/sql/0019).

        Several URLs, or ``log_servers`` embedded servers, make one log on several
        servers, the first the log's home (``log_servers.py``); its URL is ``url``
        (``log_servers`` None: ``$CAIRN_LOG_SERVERS``, else 1)."""
        self._requested_urls = _requested(url)
        self._requested_url = self._requested_urls[0] if self._requested_urls else None
        self.log_shards = log_shards if log_shards is not None else settings.log_shards()
        check_replicas(replicas, external=self._requested_url is not None)
        self.log_server_count = check_log_servers(
            self._requested_urls, settings.log_servers() if log_servers is None else log_servers
        )
        if replica_host is not None and not (replicas and server_tls and node_tls):
            raise ValueError(
                "a GCS replica on another machine (--gcs-replica-host) needs --gcs-replicas 1 "
                "and TLS between machines (a head address that is not loopback, TLS not off)"
            )
        self.replicas = replicas
        self.replica_host = replica_host
        self._node_tls = node_tls
        # for the replicas' machine, at join: one per server of the log
        self.replica_plans: list[ReplicaPlan] = []
        self._tunnels: list[PostgresTlsTunnel] = []  # to the replicas' TLS fronts
        self._embedded_options = (session_dir, listen_host, server_tls)
        self.embedded: EmbeddedPostgres | None = None  # the primary (the promoted one after)
        self.replica: EmbeddedPostgres | None = None  # until it is promoted or dropped
        self.servers: list[EmbeddedPostgres] = []  # every server the URLs name, in order
        self.other_log_servers: list[EmbeddedPostgres] = []  # embedded servers 1.. of the log
        self.watchdog: Watchdog | RemoteStandbyWatch | None = None  # server 0's
        self.other_watchdogs: list[Watchdog | RemoteStandbyWatch] = []  # of servers 1..
        self.other_replicas: list[EmbeddedPostgres] = []  # theirs, until promoted
        self._on_event = on_event
        self._lock = threading.Lock()
        self._restarting = threading.Lock()  # a restart (keep_running) or stop at a time
        self._down: dict[int, tuple[float, float]] = {}  # a server's down since, next try
        self._stopped = False
        self.url = ""  # the runtime's
        self.owner_url = ""
        self.owner_urls: list[str] = []  # every server's of the log, server 0's first

    @property
    def cluster_url(self) -> str:
        """The runtime's URL for nodes on other machines (the URL given, for a server
        that is not embedded: it is as reachable as its operator made it); every server
        of the embedded GCS, primary and replica, at the address they serve it on."""
        if self.embedded is None:
            return self.url
        host = self.embedded.listen_host or "127.0.0.1"
        entries = [f"{_bracketed(host)}:{server.port}" for server in self.servers]
        if self.replica_plans:
            plan = self.replica_plans[0]
            entries.append(f"{_bracketed(plan.host)}:{plan.port}")
        return with_hosts(self.url, entries)

    @property
    def cluster_tls(self) -> bool:
        """Whether nodes on other machines must connect with TLS and their certificate."""
        return self.embedded is not None and self.embedded.tls is not None

    def start(self) -> str:
        if self._requested_url is None:
            session_dir, listen_host, server_tls = self._embedded_options
            self.embedded = EmbeddedPostgres(session_dir, listen_host=listen_host, tls=server_tls)
            self.servers = [self.embedded]
            self.owner_url = self.embedded.start()
            self.other_log_servers = [
                EmbeddedPostgres(
                    _made(self.embedded.session_dir / LOG_SERVER_DIR.format(index)),
                    listen_host=listen_host,
                    tls=server_tls,
                )
                for index in range(1, self.log_server_count)
            ]
            owner_urls = [self.owner_url, *(s.start() for s in self.other_log_servers)]
        else:
            owner_urls = self._requested_urls
            self.owner_url = owner_urls[0]
            for url in owner_urls:
                check_reachable(url)
        for url in owner_urls:
            schema.upgrade(url)
        shards, one_server = self.log_shards, len(owner_urls) == 1
        if one_server and shards is not None and shards != schema.log_shards(self.owner_url):
            schema.set_log_shards(self.owner_url, shards)
        for url in owner_urls:
            PartitionManager(url).maintain()
        self.url = self.embedded.runtime_url() if self.embedded else self.owner_url
        runtime_urls = [self.url, *self._other_runtime_urls(owner_urls)]
        if self.replicas and self.replica_host:
            for index, urls in enumerate(zip(owner_urls, runtime_urls, strict=True)):
                owner_urls[index], runtime_urls[index] = self._plan_remote_replica(index, *urls)
            self.url = runtime_urls[0]
        elif self.replicas:
            self._start_replica()
            owner_urls[0], runtime_urls[0] = self.owner_url, self.url
            for index in range(1, len(owner_urls)):
                owner_urls[index], runtime_urls[index] = self._start_other_replica(index)
        self.owner_urls = owner_urls
        if len(owner_urls) > 1:
            addresses = [
                address_of(url, on_home_machine=self.embedded is not None) for url in runtime_urls
            ]
            place_log(owner_urls, runtime_urls, addresses, max(shards or 0, len(owner_urls)))
        return self.url

    def _other_runtime_urls(self, owner_urls: list[str]) -> list[str]:
        """The runtime's URLs of servers 1.. of the log: as given, or the embedded ones
        taking the runtime's login of server 0."""
        if self.embedded is None:
            return owner_urls[1:]
        password = self.embedded.runtime_password()
        assert password is not None  # (runtime_url() made it)
        for server in self.other_log_servers:
            server.share_runtime_password(password)
        return [server.runtime_url() for server in self.other_log_servers]

    def _plan_remote_replica(self, index: int, owner_url: str, url: str) -> tuple[str, str]:
        """Server ``index``'s replica on ``replica_host`` (made there when its node
        joins): its plan (its login, the primary's port), a tunnel to where it will
        serve, and the watch that arms failover once it streams; returns the server's
        owner's and runtime's URLs on this machine (``owner_url`` and ``url`` naming the
        tunnel too; server 0's owner's as it was), so that this machine's processes
        follow a promotion.

        The tunnel listens at 127.0.0.2 on the primary's port, so the same port number
        names a server at each address of it: 127.0.0.1 and 127.0.0.2 here, the head's
        and the replica's machine elsewhere (``server_url`` pairs server 0's hosts with
        each server's ports), and on the replica's machine after a promotion loopback
        names its replicas, as the union's foreign servers name them."""
        primary = self.embedded if index == 0 else self.other_log_servers[index - 1]
        node_tls, host = self._node_tls, self.replica_host
        assert primary is not None and node_tls is not None and host is not None
        assert primary.listen_host is not None
        replication_password = primary.replication_login()
        runtime_password = primary.runtime_password()
        assert runtime_password is not None  # (the runtime's URL was made first)
        self.replica_plans.append(
            ReplicaPlan(
                host=host,
                port=primary.port,
                primary_host=primary.listen_host,
                superuser_password=primary.superuser_password(),
                runtime_password=runtime_password,
                replication_password=replication_password,
                server=index,
            )
        )
        tunnel = PostgresTlsTunnel(
            host,
            primary.port,
            ca=node_tls.ca(),
            cert=node_tls.cert_path.read_bytes(),
            key=node_tls.key_path.read_bytes(),
            local_port=primary.port,
            local_host=TUNNEL_HOST,
        )
        self._tunnels.append(tunnel)
        tunnel.start()
        hosts = [f"127.0.0.1:{primary.port}", f"{TUNNEL_HOST}:{primary.port}"]
        watch = RemoteStandbyWatch(
            primary,
            with_hosts(url, hosts[1:]),
            on_event=self._on_event,
            server=self.replica_plans[-1].named,
        ).start()
        if index == 0:
            self.watchdog = watch
        else:
            self.other_watchdogs.append(watch)
        both = {"target_session_attrs": "read-write"}
        owner = owner_url if index == 0 else with_query(with_hosts(owner_url, hosts), both)
        return owner, with_query(with_hosts(url, hosts), both)

    def _start_replica(self) -> None:
        """Server 0's replica, the URLs naming both servers, and the watchdog."""
        primary = self.embedded
        assert primary is not None
        self.replica = primary.start_replica(session_dir=primary.session_dir / REPLICA_DIR)
        self.servers = [primary, self.replica]
        self.url = _following(self.url, self.servers)
        self.owner_url = _following(self.owner_url, self.servers)
        self.watchdog = Watchdog(
            primary, self.replica, on_event=self._on_event, on_promoted=self._promoted
        ).start()

    def _start_other_replica(self, index: int) -> tuple[str, str]:
        """Server ``index``'s replica and watchdog; its owner's and runtime's URLs
        naming both."""
        primary = self.other_log_servers[index - 1]
        replica = primary.start_replica(session_dir=primary.session_dir / REPLICA_DIR)
        self.other_replicas.append(replica)

        def promoted(replica: EmbeddedPostgres) -> None:
            with self._lock:
                self.other_log_servers[index - 1] = replica
                self.other_replicas.remove(replica)

        self.other_watchdogs.append(
            Watchdog(
                primary,
                replica,
                on_event=self._on_event,
                on_promoted=promoted,
                server=f"the GCS's server {index}",
            ).start()
        )
        pair = [primary, replica]
        return _following(primary.url, pair), _following(primary.runtime_url(), pair)

    def _promoted(self, replica: EmbeddedPostgres) -> None:
        with self._lock:
            self.embedded, self.replica = replica, None

    def keep_running(self) -> str | None:
        """Starts an embedded server of the log again if it stopped by itself (without
        replicas; with them the watchdogs fail over instead): PostgreSQL stops after a
        PANIC (a full disk under its write-ahead log: "could not write to file
        pg_wal/...: No space left on device"), its own crash recovery failing while the
        disk stays full. Tried every RESTART_EVERY_S until it starts. A server killed by
        a signal (an operator, a test, the OOM killer) is said once and left to whoever
        killed it. Returns what to tell the operator (the exit and the server log's last
        words, why a start failed, its return), else None. Meanwhile callers see an
        unreachable GCS and ride it out as a restart, for
        ``$CAIRN_GCS_UNAVAILABLE_TIMEOUT_S``."""
        with self._restarting:
            if self._stopped or self.embedded is None or self.watchdog is not None:
                return None
            servers = [self.embedded, *self.other_log_servers]
            said = [self._keep_one_running(index, server) for index, server in enumerate(servers)]
            return "\n".join(filter(None, said)) or None

    def _keep_one_running(self, index: int, server: EmbeddedPostgres) -> str | None:
        """``keep_running`` for server ``index`` of the log (its own downtime kept)."""
        what = "the GCS's PostgreSQL" if index == 0 else f"the GCS's server {index} (PostgreSQL)"
        down_since, next_try = self._down.get(index, (None, 0.0))
        if server.running:
            if down_since is None:
                return None
            del self._down[index]
            return f"{what} runs again (it was down {time.monotonic() - down_since:.1f}s)"
        code = server.exit_code
        if code is None:  # not started, or stopped on purpose
            return None
        now = time.monotonic()
        said = None
        if down_since is None:
            down_since, next_try = now, now
            if code < 0:
                self._down[index] = (down_since, math.inf)
                return f"{what} was killed (signal {-code}); it is not started again here"
            said = (
                f"{what} stopped by itself (exit code {code}); its log "
                f"{server.log_path} says:\n{server.last_words()}\n"
                f"starting it again every {RESTART_EVERY_S:g}s until it starts"
            )
        if now < next_try:
            self._down[index] = (down_since, next_try)
            return said
        first_try = next_try == down_since
        self._down[index] = (down_since, now + RESTART_EVERY_S)
        try:
            server.start()
        except EmbeddedPostgresError:
            if said is None and not first_try:
                return None
            why = f"it could not start yet:\n{server.last_words()}"
            return f"{said}\n{why}" if said else why
        del self._down[index]
        return (said + "\n" if said else "") + (
            f"{what} runs again (it was down {time.monotonic() - down_since:.1f}s)"
        )

    def stop(self) -> None:
        with self._restarting:
            self._stopped = True
        for watchdog in [self.watchdog, *self.other_watchdogs]:
            if watchdog is not None:
                watchdog.stop()
        self.watchdog, self.other_watchdogs = None, []
        for tunnel in self._tunnels:
            tunnel.stop()
        self._tunnels = []
        # the replica and the log's other servers first: their data may lie in the
        # primary's session directory
        for server in [
            *reversed(self.other_replicas),
            *reversed(self.other_log_servers),
            *reversed(self.servers),
        ]:
            server.stop()
        self.servers, self.embedded, self.replica = [], None, None
        self.other_log_servers, self.other_replicas = [], []

    def __enter__(self) -> Gcs:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
