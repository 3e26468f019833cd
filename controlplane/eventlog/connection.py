"""Connections to the GCS for the log's hot paths (asyncpg), with the one place where
driver errors about reaching the server become :class:`GcsUnavailableError`, and where
every new connection is checked (failover epoch, the log's identity: ``fencing.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar
from urllib.parse import parse_qsl, urlsplit

import asyncpg

from controlplane.errors import GcsDiskFullError, GcsFencedError, GcsUnavailableError
from controlplane.eventlog import fencing
from controlplane.gcs_url import hosts, normalize, redact, single_host_urls
from controlplane.settings import env_number

T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT_S = 5.0
# How long appenders and tailers keep retrying while the GCS is unreachable before
# they fail with GcsUnavailableError (a PostgreSQL restart fits well inside it);
# $CAIRN_GCS_UNAVAILABLE_TIMEOUT_S sets it for every process of a cluster.
DEFAULT_UNAVAILABLE_TIMEOUT_S = 30.0
UNAVAILABLE_TIMEOUT_ENV = "CAIRN_GCS_UNAVAILABLE_TIMEOUT_S"


# How long a connection's server may leave sent data unacknowledged, or keepalive
# probes unanswered, before the connection fails: a GCS machine that vanished (no RST,
# packets dropped) is noticed in seconds, not after the kernel's ~15 minutes of
# retransmissions; $CAIRN_GCS_TCP_TIMEOUT_S sets it.
DEFAULT_TCP_TIMEOUT_S = 10.0
TCP_TIMEOUT_ENV = "CAIRN_GCS_TCP_TIMEOUT_S"


def resolve_unavailable_timeout(given: float | None = None) -> float:
    """The bound on riding out an unreachable GCS: given, else the environment's."""
    if given is not None:
        return given
    return env_number(UNAVAILABLE_TIMEOUT_ENV, DEFAULT_UNAVAILABLE_TIMEOUT_S, minimum=0.001)


class ConnectionLost(Exception):
    """The connection closed under a request (asyncpg may report that as an internal
    state error when the server dies mid-request)."""


_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionLost,
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # every host answered and none takes writes: a failover under way
    asyncpg.TargetServerAttributeNotMatched,
)


def is_connection_error(exc: BaseException) -> bool:
    """True for failures that say the server could not be reached or went away, after
    which the same request may be retried (appends are idempotent)."""
    return isinstance(exc, _CONNECTION_ERRORS)


DISK_FULL_SQLSTATE = "53100"


def is_disk_full(exc: BaseException) -> bool:
    """True when PostgreSQL could not write for want of disk space under its data
    directory ("could not extend file ...: No space left on device"): nothing of the
    statement was written, and the same request may be retried once there is room."""
    return isinstance(exc, asyncpg.DiskFullError) or (
        getattr(exc, "sqlstate", None) == DISK_FULL_SQLSTATE
    )


def disk_full_error(url: str, exc: BaseException, how_long: str = "") -> GcsDiskFullError:
    """The GCS's full disk, said plainly: which GCS, that its disk is full, and
    PostgreSQL's own words (the file it could not extend)."""
    said = " ".join(str(exc).split())
    return GcsDiskFullError(
        f"the GCS at {redact(url)} is out of disk space{how_long}: the disk under its "
        f"PostgreSQL data directory is full (PostgreSQL: {said}). Free space there: "
        "appends go through again once there is room"
    )


async def run_on(
    conn: asyncpg.Connection, request: Callable[[asyncpg.Connection], Awaitable[T]]
) -> T:
    """Runs ``request`` on ``conn``; any failure that leaves the connection unusable is
    raised as a connection error (after closing it), so callers retry on a new one."""
    try:
        return await request(conn)
    except BaseException as exc:
        if is_connection_error(exc) or conn.is_closed():
            conn.terminate()
            if is_connection_error(exc):
                raise
            raise ConnectionLost(f"connection lost: {exc!r}") from exc
        raise


async def connect(
    url: str, *, timeout: float = DEFAULT_CONNECT_TIMEOUT_S, fence: bool = True
) -> asyncpg.Connection:
    """One asyncpg connection; an unreachable server raises GcsUnavailableError naming
    the URL (password hidden) at once, or after ``timeout`` if it does not answer.

    With ``fence`` (always, but for tools that only look), the server's failover epoch
    is checked first (``fencing.py``): one behind what this process has seen raises
    GcsFencedError, unless another host of a multi-host URL is current, which is then
    used instead (the old primary may come back first in the URL). In a process that
    remembers its log (node daemons, the scheduler), the same query checks that the
    server still holds that log, not behind what was seen: GcsIdentityError if not
    (wiped, replaced, put back from an older copy)."""
    url = normalize(url)
    conn = await _open(url, timeout)
    if not fence:
        return conn
    try:
        await _fenced(conn, url)
        return conn
    except GcsFencedError as refused:
        entries = list(zip(hosts(url), single_host_urls(url), strict=True))
        for entry, host_url in entries if len(entries) > 1 else []:
            try:  # each, in order: which is current?
                other = await _open(host_url, timeout)
            except Exception:  # down, a standby, ...: the next one
                continue
            try:
                await _fenced(other, host_url)
                _answered[url] = entry
                return other
            except GcsFencedError:
                continue
        raise refused from None


# the host of each multi-host URL that last answered as asked, in this process
_answered: dict[str, str] = {}


class KeptConnection:
    """The connection a long-lived part keeps for its reads of the log, used by one
    caller at a time and made anew after any failure: a connection per lookup costs a
    PostgreSQL backend's start each time (and a TLS handshake across machines)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._lock:
            if self._conn is None or self._conn.is_closed():
                self._conn = await connect(self.url)
            try:
                yield self._conn
            except BaseException:  # (in an unknown state: not used again)
                self._conn.terminate()
                self._conn = None
                raise


async def _open(url: str, timeout: float) -> asyncpg.Connection:
    """A connection to the first host of ``url`` that answers as asked, each host given
    ``timeout`` of its own: asyncpg's timeout covers all hosts together, so a lost
    machine first in the list (a handshake that hangs, a server that never answers)
    would use it all up and the next host (the replica) would never be tried. The host
    that last answered is tried first: after a failover, only the process's first
    connection waits on the lost machine, not each of its later ones."""
    host_urls = single_host_urls(url)
    if len(host_urls) == 1:
        return await _open_host(url, timeout)
    prefer_standby = _target_session_attrs(url) == "prefer-standby"
    fallback: asyncpg.Connection | None = None  # prefer-standby: the first other host
    failures: list[str] = []
    cause: BaseException | None = None
    entries = list(zip(hosts(url), host_urls, strict=True))
    answered = _answered.get(url)
    if answered is not None and not prefer_standby:  # it first, the others in order
        entries.sort(key=lambda entry: entry[0] != answered)
    try:
        for entry, host_url in entries:
            try:
                conn = await _open_host(host_url, timeout)
                if prefer_standby and not await _in_hot_standby(conn, host_url, timeout):
                    if fallback is None:
                        fallback = conn
                    else:
                        conn.terminate()
                    continue
            except GcsUnavailableError as exc:  # lost, refused, not as asked: the next one
                cause = exc.__cause__ or exc
                failures.append(f"{entry}: {_why(cause, timeout, url)}")
                continue
            if fallback is not None:
                fallback.terminate()
            _answered[url] = entry
            return conn
    except BaseException:
        if fallback is not None:
            fallback.terminate()
        raise
    if fallback is not None:
        return fallback
    raise GcsUnavailableError(
        f"cannot reach the GCS at {redact(url)}: {'; '.join(failures)}"
    ) from cause


async def _open_host(url: str, timeout: float) -> asyncpg.Connection:
    """One connection to a URL of one host (asyncpg checks ``target_session_attrs``),
    with dead-peer detection set on its socket."""
    try:
        conn = await asyncpg.connect(url, timeout=timeout)
    except BaseException as exc:
        if is_connection_error(exc):
            raise GcsUnavailableError(f"cannot reach the GCS at {redact(url)}: {exc}") from exc
        if isinstance(exc, asyncpg.InvalidCatalogNameError):  # no such database
            refused = fencing.gone(url, exc)  # the log a node was using: wiped
            if refused is not None:
                raise refused from exc
        raise
    set_tcp_timeouts(conn)
    return conn


def _target_session_attrs(url: str) -> str:
    """``target_session_attrs`` as asyncpg takes it: the URL's, else the environment's."""
    given = dict(parse_qsl(urlsplit(url).query)).get("target_session_attrs")
    return given or os.environ.get("PGTARGETSESSIONATTRS") or "any"


async def _in_hot_standby(conn: asyncpg.Connection, url: str, timeout: float) -> bool:
    """Whether the server is a standby (as asyncpg tells, for prefer-standby); closes
    the connection if it cannot say."""
    reported = getattr(conn.get_settings(), "in_hot_standby", None)  # PostgreSQL 14+
    if reported is not None:
        return reported == "on"
    try:
        return bool(await conn.fetchval("SELECT pg_catalog.pg_is_in_recovery()", timeout=timeout))
    except BaseException as exc:
        conn.terminate()
        if is_connection_error(exc):
            raise GcsUnavailableError(f"lost the GCS at {redact(url)}: {exc}") from exc
        raise


def _why(exc: BaseException, timeout: float, url: str) -> str:
    """One host's failure, in a few words (a timeout says nothing by itself)."""
    if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        return f"does not match target_session_attrs={_target_session_attrs(url)}"
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {timeout:g}s"
    return " ".join(str(exc).split()) or type(exc).__name__


def set_tcp_timeouts(conn: asyncpg.Connection) -> None:
    """Keepalive probes and TCP_USER_TIMEOUT on a connection's TCP socket, so that a
    request to a server whose machine vanished (no RST: its packets are dropped) fails
    within ``$CAIRN_GCS_TCP_TIMEOUT_S`` (default 10 s) rather than hanging for the
    kernel's retransmission timeout (~15 minutes). The user timeout bounds data left
    unacknowledged; keepalive finds the loss while a request waits on its answer.
    Unix sockets are left alone; options this platform lacks are skipped."""
    transport = getattr(conn, "_transport", None)  # asyncpg has no public way to it
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    limit = env_number(TCP_TIMEOUT_ENV, DEFAULT_TCP_TIMEOUT_S, minimum=1)
    idle = max(1, int(limit / 2))  # quiet this long: probe, then every interval
    interval = max(1, int((limit - idle) / 3))
    options = [
        (socket.IPPROTO_TCP, "TCP_KEEPIDLE", idle),
        (socket.IPPROTO_TCP, "TCP_KEEPINTVL", interval),
        (socket.IPPROTO_TCP, "TCP_KEEPCNT", 3),
        # also decides when unanswered keepalive probes end the connection (Linux)
        (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", int(limit * 1000)),
    ]
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for level, name, value in options:
            if hasattr(socket, name):
                sock.setsockopt(level, getattr(socket, name), value)
    except OSError:  # a socket already closed under us: the next request says so
        pass


async def _fenced(conn: asyncpg.Connection, url: str) -> None:
    """Checks the epoch of the server behind ``conn``; closes it if refused."""
    try:
        await fencing.check(conn, url)
    except BaseException as exc:
        conn.terminate()
        if is_connection_error(exc):
            raise GcsUnavailableError(f"lost the GCS at {redact(url)}: {exc}") from exc
        raise


async def retry_while_unavailable(
    url: str, attempt: Callable[[], Awaitable[T]], *, timeout: float
) -> T:
    """Runs ``attempt`` until it succeeds, retrying connection failures (and a full
    disk under the server's data directory) with backoff for at most ``timeout``
    seconds; then raises GcsUnavailableError (GcsDiskFullError) naming the URL."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            return await attempt()
        except BaseException as exc:
            full = is_disk_full(exc)
            if not (full or is_connection_error(exc) or isinstance(exc, GcsUnavailableError)):
                raise
            if time.monotonic() + delay > deadline:
                if full:  # the server answers, but cannot write: say so
                    how_long = f" (for {timeout:.1f}s)" if timeout else " (still)"
                    raise disk_full_error(url, exc, how_long) from exc
                how_long = f"stayed unreachable for {timeout:.1f}s" if timeout else "is still down"
                raise GcsUnavailableError(f"the GCS at {redact(url)} {how_long}: {exc}") from exc
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
