"""The cluster token: who may call a node's gRPC service (``cairn.Node``).

A cluster runs pickled code by design, so whoever can call its nodes can run code on
them; every call must therefore carry the cluster's token (``authorization: Bearer
<token>`` in the call's metadata). ``cairn start --head`` draws the token (or takes
``$CAIRN_AUTH_TOKEN``) and stores it, owner-only, in each node's session directory,
where the ``cairn`` commands of the same machine find it. Drivers need none: they
reach their node through its Unix socket, guarded by file permissions.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from controlplane.node_records import local_nodes

TOKEN_ENV = "CAIRN_AUTH_TOKEN"
TOKEN_FILE = "auth_token"
METADATA_KEY = "authorization"
REFUSED = (
    f"missing or wrong cluster token; set {TOKEN_ENV} to the token `cairn start --head` "
    f"printed (stored in the head's session directory, file {TOKEN_FILE})"
)
# a refused peer is logged at most this often, so a flood cannot fill the log
REFUSAL_LOG_INTERVAL_S = 3.0
_REFUSAL_PEERS_KEPT = 1024

OnRefused = Callable[[str, str], None]  # (method, peer)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def metadata(token: str) -> tuple[tuple[str, str]]:
    return ((METADATA_KEY, f"Bearer {token}"),)


def write_token(session_dir: Path, token: str) -> Path:
    """Stores the token readable by its owner only (0600 from the moment it exists)."""
    path = session_dir / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    return path


def read_token(session_dir: Path) -> str | None:
    try:
        return (session_dir / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def find_token(address: str) -> str | None:
    """The token to call the cluster at ``address`` (HOST:PORT of any of its nodes)
    with: ``$CAIRN_AUTH_TOKEN``, else that of a node of this machine in that cluster."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    for node in local_nodes():
        if address in (node.address, node.cluster):
            token = read_token(node.session_dir)
            if token is not None:
                return token
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _peer_host(peer: str) -> str:
    """``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7`` (each connection has its own port)."""
    host, _, port = peer.rpartition(":")
    return host if host and port.isdigit() else peer


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call whose metadata lacks the token, before any
    handler runs; ``on_refused`` hears of a refused peer at most once per interval."""

    def __init__(self, token: str, on_refused: OnRefused | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_refused = on_refused
        self._last_logged: dict[str, float] = {}

    def _authorized(self, call: grpc.HandlerCallDetails) -> bool:
        for key, value in call.invocation_metadata or ():
            if key == METADATA_KEY:
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if self._authorized(handler_call_details):
            return await continuation(handler_call_details)
        method = handler_call_details.method

        async def refuse(_request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self._refused(method, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)
            raise AssertionError("unreachable: abort raises")

        return grpc.unary_unary_rpc_method_handler(refuse)

    def _refused(self, method: str, peer: str) -> None:
        if self._on_refused is None:
            return
        host, now = _peer_host(peer), time.monotonic()
        if now - self._last_logged.get(host, float("-inf")) < REFUSAL_LOG_INTERVAL_S:
            return
        if len(self._last_logged) >= _REFUSAL_PEERS_KEPT:
            self._last_logged = {
                h: t for h, t in self._last_logged.items() if now - t < REFUSAL_LOG_INTERVAL_S
            }
        self._last_logged[host] = now
        self._on_refused(method, peer)
