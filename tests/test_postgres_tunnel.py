"""The plain-text tunnel to a PostgreSQL TLS front (what a replica on another machine
uses: the wheel's libpq tools have no TLS), and the front's replication login, with
real parts only: an embedded server, a TLS front on 127.0.0.2 (another loopback
address: "another machine" as far as the front is concerned) with a cluster CA of its
own, and tunnels on 127.0.0.1 with node certificates of that CA or of another."""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from controlplane import schema, tls
from controlplane.embedded_postgres import (
    DATABASE,
    RUNTIME_ROLE,
    EmbeddedPostgres,
    free_port,
)
from controlplane.errors import EmbeddedPostgresError
from controlplane.postgres_front import _SSL_REQUEST, PostgresTlsFront, client_context, framed
from controlplane.postgres_tunnel import PostgresTlsTunnel

pytestmark = pytest.mark.timeout(120)
REPLICATOR = "cairn_replicator"
FRONT_HOST = "127.0.0.2"


@dataclass
class Setup:
    server: EmbeddedPostgres
    authority: tls.Authority
    front: PostgresTlsFront
    front_cert: bytes  # the front's certificate (for 127.0.0.2) and key
    front_key: bytes
    node_cert: bytes  # a node certificate of the cluster CA, and its key
    node_key: bytes
    runtime_password: str
    replicator_password: str
    tunnel: PostgresTlsTunnel

    def url(
        self,
        tunnel: PostgresTlsTunnel,
        user: str = RUNTIME_ROLE,
        database: str = DATABASE,
        **params: str,
    ) -> str:
        """A libpq URL to ``tunnel`` as ``user`` (the runtime or the replicator)."""
        password = self.runtime_password if user == RUNTIME_ROLE else self.replicator_password
        query = "&".join(f"{k}={v}" for k, v in {"sslmode": "disable", **params}.items())
        local = f"127.0.0.1:{tunnel.local_port}"
        return f"postgresql://{user}:{password}@{local}/{database}?{query}"


@contextlib.contextmanager
def _tunnel(
    remote_port: int, *, ca: bytes, cert: bytes, key: bytes, **options: str
) -> Iterator[PostgresTlsTunnel]:
    tunnel = PostgresTlsTunnel(FRONT_HOST, remote_port, ca=ca, cert=cert, key=key, **options)
    tunnel.start()
    try:
        yield tunnel
    finally:
        tunnel.stop()


def _eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    authority = tls.Authority.create("Cairn cluster CA")
    server_key = tls.new_key()
    server_cert = authority.issue(server_key.public_key(), "cairn gcs", [FRONT_HOST], client=False)
    node_key = tls.new_key()
    node_cert = authority.issue(node_key.public_key(), "cairn node", ["127.0.0.1"])
    server = EmbeddedPostgres()
    front: PostgresTlsFront | None = None
    tunnel: PostgresTlsTunnel | None = None
    try:
        schema.upgrade(server.start())
        runtime_password = urlsplit(server.runtime_url()).password or ""
        replicator_password = secrets.token_urlsafe(16)
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} WITH REPLICATION LOGIN PASSWORD {}").format(
                    sql.Identifier(REPLICATOR), sql.Literal(replicator_password)
                )
            )
        front = PostgresTlsFront(
            FRONT_HOST,
            0,
            server.port,
            cert=server_cert,
            key=tls.key_pem(server_key),
            ca=authority.certificate,
            user=RUNTIME_ROLE,
            database=DATABASE,
            replication_user=REPLICATOR,
        )
        front.start()
        tunnel = PostgresTlsTunnel(
            FRONT_HOST,
            front.port,
            ca=authority.certificate,
            cert=node_cert,
            key=tls.key_pem(node_key),
        )
        tunnel.start()
        yield Setup(
            server,
            authority,
            front,
            server_cert,
            tls.key_pem(server_key),
            node_cert,
            tls.key_pem(node_key),
            runtime_password,
            replicator_password,
            tunnel,
        )
    finally:
        for each in (tunnel, front):
            if each is not None:
                each.stop()
        server.stop()


def test_a_plain_text_client_reaches_the_server_through_the_front(setup: Setup) -> None:
    admitted = setup.front.admitted
    for sslmode in ("disable", "prefer"):  # prefer: the tunnel answers "no TLS here"
        with psycopg.connect(setup.url(setup.tunnel, sslmode=sslmode)) as conn:
            assert not conn.info.pgconn.ssl_in_use  # the local half is plain text
            assert conn.execute("SELECT 1, current_user").fetchone() == (1, RUNTIME_ROLE)
    assert setup.front.admitted == admitted + 2  # both went through the TLS front


def test_a_cancel_request_goes_through_the_tunnel(setup: Setup) -> None:
    with psycopg.connect(setup.url(setup.tunnel), autocommit=True) as conn:
        backend = conn.info.backend_pid

        def cancel_once_asleep() -> None:
            with psycopg.connect(setup.server.url) as watcher:
                _eventually(
                    lambda: (
                        watcher.execute(
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE pid = %s AND query LIKE 'SELECT pg_sleep%%'",
                            (backend,),
                        ).fetchone()
                        == (1,)
                    )
                )
            conn.cancel_safe(timeout=10)

        canceller = threading.Thread(target=cancel_once_asleep)
        canceller.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(60)")
        finally:
            canceller.join()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_pg_basebackup_streams_through_the_tunnel(setup: Setup) -> None:
    server = setup.server
    # as libpq's replication tools send it: the database "replication" (which the
    # server ignores in this mode)
    url = setup.url(setup.tunnel, REPLICATOR, "replication", replication="true")
    with psycopg.connect(url, autocommit=True) as walsender:  # a physical replication link
        identified = walsender.pgconn.exec_(b"IDENTIFY_SYSTEM")
        assert identified.status == psycopg.pq.ExecStatus.TUPLES_OK
        system_id = identified.get_value(0, 0)
    with psycopg.connect(server.url) as conn:
        row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
    assert row is not None and system_id == row[0].encode()

    # the wheel's own pg_basebackup (as the server's system user when we are root)
    parent = server.session_dir / "basebackup"
    parent.mkdir(mode=0o700)
    try:
        if server._run_as is not None:
            shutil.chown(parent, server._run_as.uid, server._run_as.gid)
        copy = parent / "pgdata"
        server._run_tool(
            "pg_basebackup",
            "-D",
            str(copy),
            "-d",
            f"host=127.0.0.1 port={setup.tunnel.local_port} user={REPLICATOR} sslmode=disable",
            "-X",
            "stream",  # a second replication connection, for the WAL, alongside the copy
            "--checkpoint=fast",
            env={"PGPASSWORD": setup.replicator_password},
        )
        assert (copy / "PG_VERSION").read_text() == (server.data_dir / "PG_VERSION").read_text()
        assert any((copy / "pg_wal").glob("0000*"))
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_the_front_admits_no_other_replication_or_login(setup: Setup) -> None:
    refused = {
        "the runtime, for replication": setup.url(
            setup.tunnel, database="replication", replication="true"
        ),
        "the replicator, for replication to a database": setup.url(
            setup.tunnel, REPLICATOR, replication="true"
        ),
        "the replicator, not for replication": setup.url(setup.tunnel, REPLICATOR),
        "the replicator, for logical replication": setup.url(
            setup.tunnel, REPLICATOR, replication="database"
        ),
    }
    admitted = setup.front.admitted
    for case, url in refused.items():
        with pytest.raises(psycopg.OperationalError, match="only the login 'cairn_runtime'"):
            psycopg.connect(url, connect_timeout=10)
            pytest.fail(f"{case} got in")
    assert setup.front.admitted == admitted

    # a front without a replication login refuses the replicator as before
    plain_front = PostgresTlsFront(
        FRONT_HOST,
        0,
        setup.server.port,
        cert=setup.front_cert,
        key=setup.front_key,
        ca=setup.authority.certificate,
        user=RUNTIME_ROLE,
        database=DATABASE,
    )
    plain_front.start()
    try:
        with _tunnel(
            plain_front.port,
            ca=setup.authority.certificate,
            cert=setup.node_cert,
            key=setup.node_key,
        ) as tunnel:
            replication = setup.url(tunnel, REPLICATOR, "replication", replication="true")
            with pytest.raises(psycopg.OperationalError, match="not 'cairn_replicator' for"):
                psycopg.connect(replication, connect_timeout=10)
        assert plain_front.admitted == 0 and plain_front.refused == 1
    finally:
        plain_front.stop()


def test_unencrypted_bytes_after_the_tls_request_are_refused(setup: Setup) -> None:
    """A client (or a man in the middle) that sends its startup packet in plain text
    right behind the TLS request is refused before the handshake."""
    startup = struct.pack("!I", 3 << 16) + b"user\0cairn_runtime\0database\0cairn\0\0"
    with socket.create_connection((FRONT_HOST, setup.front.port), timeout=10) as raw:
        raw.sendall(framed(struct.pack("!I", _SSL_REQUEST)) + framed(startup))
        answer = raw.recv(4096)
    assert answer.startswith(b"E") and b"unencrypted data after the TLS request" in answer


def test_a_tunnel_checks_the_fronts_certificate(setup: Setup) -> None:
    other = tls.Authority.create("Cairn cluster CA")
    key = setup.node_key
    for ca, options, reason in (
        (other.certificate, {}, "self-signed certificate in certificate chain"),  # another CA
        (setup.authority.certificate, {"server_hostname": "gcs.cairn.invalid"}, "mismatch"),
        # (the front's certificate names 127.0.0.2 only)
    ):
        admitted, refused = setup.front.admitted, setup.front.refused
        with _tunnel(setup.front.port, ca=ca, cert=setup.node_cert, key=key, **options) as tunnel:
            with pytest.raises(psycopg.OperationalError) as failure:
                psycopg.connect(setup.url(tunnel), connect_timeout=10)
            assert re.search(f"FATAL: .*{FRONT_HOST}:{setup.front.port}", str(failure.value))
            assert "its certificate is not one of the cluster CA" in str(failure.value)
            assert reason in str(failure.value) and tunnel.failed == 1
        _eventually(lambda r=refused: setup.front.refused > r)  # the front saw it abandoned
        assert setup.front.admitted == admitted  # nothing reached the server


def test_the_front_refuses_a_tunnel_with_a_certificate_of_another_ca(setup: Setup) -> None:
    other = tls.Authority.create("Cairn cluster CA")
    key = tls.new_key()
    forged = other.issue(key.public_key(), "cairn node", ["127.0.0.1"])
    admitted, refused = setup.front.admitted, setup.front.refused
    with _tunnel(
        setup.front.port, ca=setup.authority.certificate, cert=forged, key=tls.key_pem(key)
    ) as tunnel:
        with pytest.raises(psycopg.OperationalError, match="does the front's CA know") as failure:
            psycopg.connect(setup.url(tunnel), connect_timeout=10)
        assert f"{FRONT_HOST}:{setup.front.port}" in str(failure.value)
    _eventually(lambda: setup.front.refused > refused)
    assert setup.front.admitted == admitted


def test_an_unreachable_remote_is_named_to_the_client(setup: Setup) -> None:
    dead = free_port()
    with (
        _tunnel(
            dead, ca=setup.authority.certificate, cert=setup.node_cert, key=setup.node_key
        ) as tunnel,
        pytest.raises(psycopg.OperationalError) as failure,
    ):
        psycopg.connect(setup.url(tunnel), connect_timeout=10)
    message = str(failure.value)
    assert f"FATAL:  Cairn tunnel to the PostgreSQL TLS front at {FRONT_HOST}:{dead}" in message
    assert message.endswith("cannot connect: Connection refused")

    # a PostgreSQL that is not behind a TLS front: the wheel's server answers "no TLS"
    tunnel = PostgresTlsTunnel(
        "127.0.0.1",
        setup.server.port,
        ca=setup.authority.certificate,
        cert=setup.node_cert,
        key=setup.node_key,
    )
    tunnel.start()
    try:
        with pytest.raises(psycopg.OperationalError, match="it does not speak TLS"):
            psycopg.connect(setup.url(tunnel), connect_timeout=10)
    finally:
        tunnel.stop()


def test_pg_basebackup_says_why_it_cannot_reach_the_remote(setup: Setup) -> None:
    dead = free_port()
    with (
        _tunnel(
            dead, ca=setup.authority.certificate, cert=setup.node_cert, key=setup.node_key
        ) as tunnel,
        pytest.raises(EmbeddedPostgresError, match=f"{FRONT_HOST}:{dead}: cannot connect"),
    ):
        setup.server._run_tool(
            "pg_basebackup",
            "-D",
            str(setup.server.session_dir / "never"),
            "-d",
            f"host=127.0.0.1 port={tunnel.local_port} user={REPLICATOR}",
            env={"PGPASSWORD": setup.replicator_password},
        )


def test_a_stopped_front_drops_a_silent_tls_client_at_once(setup: Setup) -> None:
    """A front that stops (its server killed in a failover) drops its connections
    without a TLS goodbye: a peer that never answers one held the stop up until it
    raised, and the failover with it."""
    front = PostgresTlsFront(
        FRONT_HOST,
        0,
        setup.server.port,
        cert=setup.front_cert,
        key=setup.front_key,
        ca=setup.authority.certificate,
        user=RUNTIME_ROLE,
        database=DATABASE,
    )
    front.start()
    context = client_context(setup.authority.certificate, setup.node_cert, setup.node_key)
    with socket.create_connection((FRONT_HOST, front.port), timeout=10) as raw:
        raw.sendall(framed(struct.pack("!I", _SSL_REQUEST)))
        assert raw.recv(1) == b"S"
        with context.wrap_socket(raw, server_hostname=FRONT_HOST) as secure:
            secure.do_handshake()  # then silent: it reads nothing, answers nothing
            _eventually(lambda: len(front._serving._writers) == 1)
            front.stop()
            secure.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert secure.recv(1) == b""  # dropped: no data, the connection ended
