"""The node daemon's gRPC service (``cairn.Node``), for what crosses a node boundary.

``Info`` (the node's id, resources and load); on the head, ``Join`` (what a node
joining the cluster needs: the GCS URL); ``ObjectInfo`` and ``ReadObject`` (an
object's size, then its bytes one chunk per call), ``Release`` (the puller has its
copy: the node may free its own), ``Metrics`` (controlplane/node/metrics.py) and
``ReadLog`` (a file of its logs directory, listed or a bounded range read:
controlplane/logs.py). Messages
are JSON objects, so no generated code is needed (grpcio's generic handlers). Every
call carries the cluster token, and the server refuses calls without it before any
handler runs (one interceptor, controlplane/auth.py); every client made here
(``unary_stub``, ``raw_stub``, ``call``) adds it. The server listens on loopback unless
told otherwise. With TLS (controlplane/tls.py) every link is mutual TLS under the
cluster CA, and each peer's certificate is checked on each call; channels to other
nodes are kept, one per address, so a handshake is paid once per peer, not per call.

Every call between nodes carries the caller's log clock (``cairn-clock`` metadata: the
highest log position its process has seen, eventlog/clock.py) and every answer the
callee's (trailing metadata); each side moves its clock past the other's. On a log on
several servers, what a process appends after a call is then placed past whatever the
other side had seen or appended before it answered (an object's ``created``, before its
bytes were read), whichever servers the two events lie on.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from controlplane import auth, tls
from controlplane.eventlog.clock import PROCESS_CLOCK, LogClock
from dataplane.transfer import CHUNK_SIZE, Call, LinkError, Refused

SERVICE = "cairn.Node"
DEFAULT_HEAD_PORT = 6380
_JOIN_TIMEOUT_S = 5.0
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 2 * CHUNK_SIZE),
    ("grpc.max_receive_message_length", 2 * CHUNK_SIZE),
]

Handler = Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]
RawHandler = Callable[[dict[str, Any]], Awaitable[bytes]]  # may raise Refused

_token: str | None = None  # this process's cluster token, added to every call it makes
_node_id: str | None = None  # the node this process is, named in every call it makes
NODE_METADATA_KEY = "cairn-node"
CLOCK_METADATA_KEY = "cairn-clock"
STALE_REFUSED = "was declared dead"
_tls: tls.NodeTls | None = None  # this process's certificate, for every channel it opens
_channels: dict[str, grpc.aio.Channel] = {}


def use_token(token: str | None) -> None:
    """Sets the token this process's calls carry (a node daemon's, once, at start)."""
    global _token
    _token = token


def use_node_id(node_id: str | None) -> None:
    """Sets the node this process's calls say they come from: a node that was declared
    dead and comes back (an old incarnation) is refused by its peers (``StaleCheck``)."""
    global _node_id
    _node_id = node_id


def use_tls(node_tls: tls.NodeTls | None) -> None:
    """Sets the certificate this process's channels present (None: plain text)."""
    global _tls
    _tls = node_tls
    _channels.clear()


def channel(address: str) -> grpc.aio.Channel:
    """This process's channel to the node at ``address`` (TLS when it has a
    certificate), opened once and kept: gRPC reconnects it as needed."""
    found = _channels.get(address)
    if found is None:
        if _tls is None:
            found = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            credentials = _tls.channel_credentials()
            found = grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        _channels[address] = found
    return found


async def close_channels() -> None:
    channels = list(_channels.values())
    _channels.clear()
    for open_channel in channels:
        await open_channel.close()


def _with_token(stub: Any, token: str | None, clock: LogClock = PROCESS_CLOCK) -> Any:
    """``stub`` called with the token, this node's id and ``clock`` (as it stands at
    each call), ``clock`` moved past the callee's from its answer."""
    metadata = (*(auth.metadata(token) if token else ()), *_identity())

    async def clocked(request: dict[str, Any], *, timeout: float | None = None) -> Any:
        sent = (*metadata, (CLOCK_METADATA_KEY, str(clock.position)))
        answering = stub(request, timeout=timeout, metadata=sent)
        answer = await answering
        _see_clock(clock, await answering.trailing_metadata())
        return answer

    return clocked


def _see_clock(clock: LogClock, metadata: Any) -> None:
    """Moves ``clock`` past the one the other side sent, if it sent one (a value that is
    no position is ignored: it moves nothing)."""
    value = dict(metadata or ()).get(CLOCK_METADATA_KEY)
    if isinstance(value, str) and value.isdigit():
        clock.saw(int(value))


def _identity() -> tuple[tuple[str, str], ...]:
    return ((NODE_METADATA_KEY, _node_id),) if _node_id else ()


OnStale = Callable[[str, str, str], None]  # (node id, method, peer)


class StaleCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # (grpc is untyped)
    """Refuses (FAILED_PRECONDITION) calls from a node the cluster declared dead: its
    old incarnation, back from a partition, must not hand out late results or take late
    work; ``on_stale`` hears of each refusal."""

    def __init__(self, is_dead: Callable[[str], bool], on_stale: OnStale) -> None:
        self._is_dead, self._on_stale = is_dead, on_stale

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        caller = dict(handler_call_details.invocation_metadata or ()).get(NODE_METADATA_KEY)
        if not caller or not self._is_dead(str(caller)):
            return await continuation(handler_call_details)
        method = handler_call_details.method

        async def refuse(_request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self._on_stale(str(caller), method, context.peer())
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {caller} {STALE_REFUSED}: it must rejoin the cluster under a new id",
            )
            raise AssertionError("unreachable: abort raises")

        return grpc.unary_unary_rpc_method_handler(refuse)


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def _decode(data: bytes) -> dict[str, Any]:
    value = json.loads(data) if data else {}
    if not isinstance(value, dict):
        raise ValueError("a cairn.Node message must be a JSON object")
    return value


def _raw(
    handler: RawHandler, clock: LogClock
) -> Callable[[dict[str, Any], grpc.aio.ServicerContext], Awaitable[bytes]]:
    async def answer(request: dict[str, Any], context: grpc.aio.ServicerContext) -> bytes:
        _see_clock(clock, context.invocation_metadata())
        try:
            answered = await handler(request)
        except Refused as refused:
            await context.abort(grpc.StatusCode[refused.code], refused.details)
            raise AssertionError("unreachable: abort raises") from None
        context.set_trailing_metadata(((CLOCK_METADATA_KEY, str(clock.position)),))
        return answered

    return answer


def _unary(handler: Handler, clock: LogClock) -> grpc.RpcMethodHandler:
    async def answer(request: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
        _see_clock(clock, context.invocation_metadata())
        answered = handler(request)
        out = await answered if inspect.isawaitable(answered) else answered
        context.set_trailing_metadata(((CLOCK_METADATA_KEY, str(clock.position)),))
        return out

    return grpc.unary_unary_rpc_method_handler(
        answer, request_deserializer=_decode, response_serializer=_encode
    )


async def serve(
    host: str,
    port: int,
    handlers: dict[str, Handler],
    raw_handlers: dict[str, RawHandler] | None = None,
    *,
    token: str | None,
    on_refused: auth.OnRefused | None = None,
    node_tls: tls.NodeTls | None = None,
    stale_check: StaleCheck | None = None,
    clock: LogClock = PROCESS_CLOCK,
) -> tuple[grpc.aio.Server, int]:
    """Starts the service on host:port (0: a free port); returns it and its port.
    ``handlers`` answer a JSON object; ``raw_handlers`` answer raw bytes. With a
    ``token``, calls without it are refused (``on_refused`` hears of them); None (auth
    disabled) serves anyone who can connect. With ``node_tls``, mutual TLS under the
    cluster CA; a head (``Join`` among the handlers) also lets joiners in with a
    bootstrap certificate derived from the token, for ``Join`` alone."""
    methods = {name: _unary(handler, clock) for name, handler in handlers.items()}
    for name, raw in (raw_handlers or {}).items():
        methods[name] = grpc.unary_unary_rpc_method_handler(
            _raw(raw, clock), request_deserializer=_decode, response_serializer=bytes
        )
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if token is not None:
        interceptors.append(auth.TokenCheck(token, on_refused))
    joins = "Join" in handlers and token is not None
    if node_tls is not None:
        interceptors.append(tls.PeerCheck(node_tls.ca(), [f"/{SERVICE}/Join"] if joins else []))
    if stale_check is not None:
        interceptors.append(stale_check)
    server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=interceptors)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, methods)])
    if node_tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        credentials = node_tls.server_credentials(token if joins else None)
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (in use?)")
    await server.start()
    return server, bound


def raw_stub(channel: grpc.aio.Channel, method: str, clock: LogClock = PROCESS_CLOCK) -> Any:
    """A client of one of ``raw_handlers`` (request: a JSON object; response: bytes)."""
    stub = channel.unary_unary(
        f"/{SERVICE}/{method}", request_serializer=_encode, response_deserializer=bytes
    )
    return _with_token(stub, _token, clock)


def unary_stub(channel: grpc.aio.Channel, method: str, clock: LogClock = PROCESS_CLOCK) -> Any:
    stub = channel.unary_unary(
        f"/{SERVICE}/{method}", request_serializer=_encode, response_deserializer=_decode
    )
    return _with_token(stub, _token, clock)


class Link:
    """Calls to other nodes over this process's channels (token, TLS, identity, the
    process's log clock), as dataplane/transfer.py's NodeLink: a failed call is a
    LinkError."""

    def __init__(self, clock: LogClock = PROCESS_CLOCK) -> None:
        self.clock = clock

    def unary(self, address: str, method: str) -> Call:
        return _link_errors(unary_stub(channel(address), method, self.clock))

    def raw(self, address: str, method: str) -> Call:
        return _link_errors(raw_stub(channel(address), method, self.clock))


def _link_errors(stub: Any) -> Call:
    async def call(request: dict[str, Any], *, timeout: float | None = None) -> Any:
        try:
            return await stub(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise LinkError(exc.code().name, exc.details() or "") from None

    return call


class AuthError(PermissionError):
    """The node refused the call: no token, or the wrong one."""


def call(
    address: str,
    method: str,
    request: dict[str, Any],
    timeout: float,
    token: str | None = None,
    *,
    secure: tls.NodeTls | tls.Bootstrap | None = None,
) -> dict[str, Any]:
    """One blocking call to a node's service, with ``token`` (by default this process's,
    else ``$CAIRN_AUTH_TOKEN`` or that of a node of this machine in the same cluster),
    over TLS with ``secure`` (a node's certificate, or a joiner's bootstrap one);
    AuthError if the node refuses it, ConnectionError naming the address if it cannot be
    reached within ``timeout`` seconds."""
    token = token or _token or auth.find_token(address)
    metadata = (*(auth.metadata(token) if token else ()), *_identity())
    if secure is None:
        opened = grpc.insecure_channel(address)
    elif isinstance(secure, tls.Bootstrap):
        opened = grpc.secure_channel(address, secure.credentials, options=secure.options)
    else:
        opened = grpc.secure_channel(address, secure.channel_credentials())
    with opened as channel:
        stub = channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=_encode, response_deserializer=_decode
        )
        try:
            answer: dict[str, Any] = stub(request, timeout=timeout, metadata=metadata)
            return answer
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            if code in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.FAILED_PRECONDITION,
            ):
                raise AuthError(f"the Cairn node at {address} refused the call: {detail}") from None
            if secure is not None and code == grpc.StatusCode.UNAVAILABLE:
                raise ConnectionError(
                    f"cannot reach a Cairn head at {address} over TLS ({detail}): it is down, "
                    "it runs without TLS (join it with --tls off), or the cluster token is "
                    "not the head's (the TLS handshake proves both sides hold the same token)"
                ) from None
            raise ConnectionError(
                f"cannot reach a Cairn head at {address}: {code.name if code else ''} {detail}"
            ) from None


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"the address must be HOST:PORT, got {address!r}")
    return host, int(port)


def join(
    address: str,
    token: str | None = None,
    timeout: float = _JOIN_TIMEOUT_S,
    *,
    request: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a joining node needs from the head at ``address`` (HOST:PORT). With a
    ``request`` holding a certificate signing request (``csr``), over TLS: the answer
    holds the node's certificate and the cluster CA's."""
    split_address(address)
    secure = None
    if request is not None and request.get("csr"):
        if token is None:
            raise AuthError(f"joining {address} over TLS needs the cluster token")
        secure = tls.Bootstrap.from_token(token)
    return call(address, "Join", request or {}, timeout, token, secure=secure)
