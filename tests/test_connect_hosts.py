"""Connecting to a GCS named by several hosts when one of them is a lost machine, and
noticing a lost machine under an established connection.

A lost machine does not refuse: its packets are dropped (the TCP handshake hangs) or, if
something still accepts, nothing ever answers. Each host of a multi-host URL gets the
connect timeout to itself, so the next host (the replica on another machine) is reached
in about one timeout, not never. Hosts that do not match ``target_session_attrs`` (a
standby, for read-write) are skipped. Established connections carry TCP keepalive and
TCP_USER_TIMEOUT, so a request to a vanished server fails in seconds rather than after
the kernel's ~15 minutes of retransmissions (checked for real in a network namespace
of its own, where packets to the server are dropped with nftables)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from hosts import ensure_nft, require_root

from controlplane.embedded_postgres import EmbeddedPostgres
from controlplane.errors import GcsUnavailableError
from controlplane.eventlog.connection import KeptConnection, connect
from controlplane.gcs_url import hosts, redact, with_hosts, with_query

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
TCP_TIMEOUT_ENV = "CAIRN_GCS_TCP_TIMEOUT_S"


@contextlib.asynccontextmanager
async def silent_host() -> AsyncIterator[str]:
    """``host:port`` of a listener that accepts connections and never sends a byte (a
    server frozen, or a machine whose firewall still completes handshakes)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def dropping_host() -> AsyncIterator[str]:
    """``host:port`` whose handshakes hang as for a machine that is gone: a listener
    that never accepts, its accept queue full (``listen(0)`` holds one), so the kernel
    drops every further SYN."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        filler.close()
        listener.close()


BLACK_HOLES = {"silent": silent_host, "dropping": dropping_host}


def read_write(url: str) -> str:
    return with_query(url, {"target_session_attrs": "read-write"})


async def test_a_kept_connection_serves_lookup_after_lookup_and_is_made_anew_after_a_failure(
    gcs_url: str,
) -> None:
    """A node's parts that read the log now and then (names, where borrowed actors live)
    keep one connection rather than start a PostgreSQL backend per lookup; one that
    failed in a lookup is not used again."""
    kept = KeptConnection(gcs_url)
    pid = "SELECT pg_backend_pid()"
    async with kept.use() as conn:
        first = await conn.fetchval(pid)
    async with kept.use() as conn:
        assert await conn.fetchval(pid) == first  # the same backend
    with pytest.raises(asyncpg.DivisionByZeroError):
        async with kept.use() as conn:
            await conn.fetchval("SELECT 1 / 0")
    async with kept.use() as conn:
        again = await conn.fetchval(pid)
        assert again != first
        await conn.close()  # (closed under it, as by a server restart: made anew)
    async with kept.use() as conn:
        assert await conn.fetchval(pid) not in (first, again)
        await conn.close()


@pytest.mark.parametrize("kind", list(BLACK_HOLES))
async def test_a_lost_first_host_costs_one_timeout_then_the_next_is_used(
    gcs_url: str, kind: str
) -> None:
    async with BLACK_HOLES[kind]() as hole:
        url = read_write(with_hosts(gcs_url, [hole, *hosts(gcs_url)]))
        started = time.monotonic()
        conn = await connect(url, timeout=1.0)
        elapsed = time.monotonic() - started
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    print(f"{kind} first host: connected to the second after {elapsed:.2f}s")
    assert 0.9 < elapsed < 1.6  # its own timeout for the lost host, then at once


async def test_only_lost_hosts_is_gcs_unavailable_naming_the_url(gcs_url: str) -> None:
    async with silent_host() as silent, dropping_host() as dropping:
        url = read_write(with_hosts(gcs_url, [silent, dropping]))
        password = url.split("@")[0].rsplit(":", 1)[1]
        started = time.monotonic()
        with pytest.raises(GcsUnavailableError) as raised:
            await connect(url, timeout=0.5)
        elapsed = time.monotonic() - started
    message = str(raised.value)
    print(f"two lost hosts: {elapsed:.2f}s: {message}")
    assert redact(url) in message
    assert password not in message
    assert f"{silent}: no answer within 0.5s" in message
    assert f"{dropping}: no answer within 0.5s" in message
    assert 0.9 < elapsed < 1.5  # each host its own timeout, in turn


@pytest.fixture(scope="module")
def primary_and_standby() -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    primary = EmbeddedPostgres()
    standby = None
    try:
        primary.start()
        standby = primary.start_replica(synchronous=False)
        yield primary, standby
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()


async def test_a_standby_is_skipped_for_read_write_and_preferred_for_prefer_standby(
    primary_and_standby: tuple[EmbeddedPostgres, EmbeddedPostgres],
) -> None:
    primary, standby = primary_and_standby
    first, second = f"127.0.0.1:{standby.port}", f"127.0.0.1:{primary.port}"

    async def port_reached(url: str) -> int:
        conn = await connect(url, timeout=2.0)
        try:
            return int(await conn.fetchval("SELECT inet_server_port()"))
        finally:
            await conn.close()

    async with silent_host() as hole:
        url = read_write(with_hosts(primary.url, [hole, first, second]))
        started = time.monotonic()
        assert await port_reached(url) == primary.port
        print(f"lost host, standby, primary: the primary after {time.monotonic() - started:.2f}s")

    with pytest.raises(GcsUnavailableError, match="target attribute"):  # asyncpg's words
        await connect(read_write(with_hosts(primary.url, [first])), timeout=2.0)
    standbys_only = read_write(with_hosts(primary.url, [first, first]))
    with pytest.raises(GcsUnavailableError) as raised:
        await connect(standbys_only, timeout=2.0)
    said = f"{first}: does not match target_session_attrs=read-write"
    assert str(raised.value) == f"cannot reach the GCS at {redact(standbys_only)}: {said}; {said}"

    prefer = with_query(
        with_hosts(primary.url, [second, first]), {"target_session_attrs": "prefer-standby"}
    )
    assert await port_reached(prefer) == standby.port
    only_primary = with_query(
        with_hosts(primary.url, [second, second]), {"target_session_attrs": "prefer-standby"}
    )
    assert await port_reached(only_primary) == primary.port


def tcp_options(sock: socket.socket) -> dict[str, int]:
    names = ["TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT"]
    found = {"SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)}
    for name in names:
        if hasattr(socket, name):
            found[name] = sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
    return found


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux TCP options")
async def test_connections_carry_keepalive_and_a_user_timeout(
    gcs_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def options(url: str) -> dict[str, int]:
        conn = await connect(url, timeout=2.0)
        try:
            sock = conn._transport.get_extra_info("socket")  # type: ignore[attr-defined]
            assert sock.family in (socket.AF_INET, socket.AF_INET6)
            return tcp_options(sock)
        finally:
            await conn.close()

    monkeypatch.delenv(TCP_TIMEOUT_ENV, raising=False)
    default = await options(gcs_url)
    assert default["SO_KEEPALIVE"] == 1
    assert default["TCP_USER_TIMEOUT"] == 10_000
    assert default["TCP_KEEPIDLE"] + default["TCP_KEEPINTVL"] * default["TCP_KEEPCNT"] <= 10

    monkeypatch.setenv(TCP_TIMEOUT_ENV, "4")  # and on each host of a multi-host URL
    async with silent_host() as hole:
        configured = await options(read_write(with_hosts(gcs_url, [hole, *hosts(gcs_url)])))
    assert configured["SO_KEEPALIVE"] == 1
    assert configured["TCP_USER_TIMEOUT"] == 4_000
    assert configured["TCP_KEEPIDLE"] < 4  # a probe goes out before the user timeout


# -- a machine that vanishes under an established connection ---------------------------

VANISH = textwrap.dedent(
    """
    import asyncio, os, subprocess, sys, time

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.environ["CAIRN_GCS_TCP_TIMEOUT_S"] = "2"
    from controlplane.embedded_postgres import EmbeddedPostgres
    from controlplane.eventlog.connection import KeptConnection, connect

    def nft(*args):
        subprocess.run(["nft", *args], check=True)

    async def main(url, port):
        asking = await connect(url, fence=False)  # will send a request after the loss
        waiting = await connect(url, fence=False)  # waits on an answer during the loss
        assert await asking.fetchval("SELECT 1") == 1
        slow = asyncio.ensure_future(waiting.fetchval("SELECT pg_sleep(60)"))
        await asyncio.sleep(0.5)  # the request is sent and acknowledged
        nft("add", "table", "inet", "lost")
        nft("add", "chain", "inet", "lost", "in", "{ type filter hook input priority 0; }")
        nft("add", "rule", "inet", "lost", "in", "tcp", "dport", str(port), "drop")
        nft("add", "rule", "inet", "lost", "in", "tcp", "sport", str(port), "drop")
        lost = time.monotonic()

        async def outcome(request):
            try:
                await asyncio.wait_for(request, 30)
                return "answered"
            except Exception as exc:
                return f"{type(exc).__name__} {time.monotonic() - lost:.2f}"

        results = await asyncio.gather(outcome(asking.fetchval("SELECT 1")), outcome(slow))
        print("asking:", results[0])
        print("waiting:", results[1])

    server = EmbeddedPostgres()
    try:
        asyncio.run(main(server.start(), server.port))
    finally:
        server.stop()
    """
)


def test_a_request_to_a_vanished_server_fails_within_the_tcp_timeout() -> None:
    """In a network namespace of its own (nothing outside it is touched): a server whose
    packets are dropped from one moment on, as when its machine is lost. Both a request
    sent after the loss and one waiting on its answer fail within about
    ``CAIRN_GCS_TCP_TIMEOUT_S`` (2 s here), not after ~15 minutes of retransmissions."""
    require_root()
    ensure_nft()  # (it was skipped, at collection, on a machine that had none yet)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(TCP_TIMEOUT_ENV, None)
    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", VANISH],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    outcomes = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    for which in ("asking", "waiting"):
        kind, seconds = outcomes[which].split()
        assert kind == asyncpg.ConnectionDoesNotExistError.__name__, outcomes  # lost
        assert float(seconds) < 6, outcomes  # 2 s, and a probe's second or so
