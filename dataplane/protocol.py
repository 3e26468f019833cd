"""The node-local wire protocol between the node daemon and its clients (drivers and
workers): length-prefixed frames over a Unix socket, each frame one pickled message.

Only processes of the same session on the same machine speak it (the socket lives in
the session directory, mode 0700), so pickle is acceptable here; what crosses a node
boundary uses gRPC (issue 5).

A frame is a u32 body length, a u64 xxh3-64 checksum of the body, then the body: a
damaged message is a ProtocolError (the daemon closes that one connection), never a
different message. Frames stored in the log before checksums (a u32 length only) are
still read by ``decode_frame``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import shutil
import socket
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

import xxhash

_FRAME = struct.Struct("<IQ")  # body length, xxh3-64 of the body
_LEGACY_FRAME = struct.Struct("<I")  # body length: frames in logs written before checksums
MAX_FRAME = 1 << 31


class ProtocolError(ConnectionError):
    """A frame that cannot be a message: too large, truncated, damaged (its checksum
    does not match) or not unpicklable."""


# -- descriptors ---------------------------------------------------------------------


@dataclass(slots=True)
class ErrorInfo:
    """Why an object has no value. ``kind``: task_error (the function raised; ``cause``
    is the pickled exception when it could be pickled), worker_crashed, cancelled,
    object_lost, system."""

    kind: str
    message: str
    function_name: str = ""
    traceback: str = ""
    cause: bytes | None = None
    retryable: bool = True  # False: retry_exceptions lists classes and this is none

    @classmethod
    def cancelled(cls, name: str) -> ErrorInfo:
        """What a cancelled task (or actor call) named ``name`` stands for."""
        return cls("cancelled", f"task {name} was cancelled", name)


@dataclass(slots=True)
class ObjectLocation:
    """Where an object's bytes are: inline (small objects travel in messages) or in
    this node's store, ``size`` bytes at ``offset`` in its arena region number
    ``region`` (dataplane/arena.py); or on the node at ``remote`` (made there; ask this
    node's daemon for it, which fetches it); or the error that the object stands for.
    ``contained``: ids of refs serialized inside the value."""

    object_id: str
    inline: bytes | None = None
    region: int | None = None
    size: int = 0
    error: ErrorInfo | None = None
    contained: tuple[str, ...] = ()
    remote: str | None = None
    offset: int = 0


@dataclass(slots=True)
class Arg:
    """A task argument: a value (serialized, inline) or a reference to an object whose
    value the worker receives (top-level refs only, as in Ray)."""

    inline: bytes | None = None
    ref: str | None = None


@dataclass(slots=True)
class TaskSpec:
    task_id: str
    job_id: str
    name: str
    function_id: str
    args: list[Arg]
    kwargs: dict[str, Arg]
    num_returns: int
    resources: dict[str, float]
    max_retries: int
    retry_exceptions: bool
    retry_exception_types: bytes | None = None  # cloudpickled tuple; None: any exception
    contained_refs: tuple[str, ...] = ()  # refs nested inside inline arguments
    parent_task_id: str | None = None
    # Actors: the creation task has method "__init__" (its function is the class);
    # a method call names its method and its caller's sequence number.
    actor_id: str | None = None
    method: str | None = None
    sequence: int = 0
    actor_options: ActorOptions | None = None  # on the creation task
    # None: default (local first); ("SPREAD",); ("NODE_AFFINITY", node id, "soft"|"hard");
    # ("PLACEMENT_GROUP", pg id, bundle index (-1: any), "capture"|"")
    strategy: tuple[str, ...] | None = None
    # how many of its tasks one worker runs before it exits (0: no limit); a spec
    # logged before it existed has none: read it with getattr(spec, "max_calls", 0)
    max_calls: int = 0
    # its runtime_env as Cairn honours it (sdk/runtime_env.py); None: none. Likewise
    # absent from specs logged before it existed: getattr(spec, "runtime_env", None)
    runtime_env: dict[str, Any] | None = None
    dag_id: str | None = None  # the DAG execution it is part of (sdk/dag.py); likewise
    # the labels its node must have (controlplane/labels.py's selector); likewise
    label_selector: dict[str, dict[str, list[Any]]] | None = None
    labels: dict[str, str] | None = None  # its own (Ray's _labels option); likewise
    # an actor call's own max_task_retries (a method option; None: its actor's) and the
    # concurrency group it runs in (None: its method's); likewise
    max_task_retries: int | None = None
    concurrency_group: str | None = None
    # a streaming generator's _generator_backpressure_num_objects: it pauses while this
    # many of its values are not taken by its caller (-1: never); likewise
    generator_backpressure: int = -1
    # the namespace of its job (its driver's, passed on to the tasks and actors it makes:
    # a worker on any node knows it); likewise
    namespace: str | None = None

    def return_ids(self) -> list[str]:
        """Its fixed returns (none for a streaming generator: its values are made as it
        yields them, ``return_object_id(task_id, i)`` for the i-th; one for a dynamic
        generator, whose values follow it)."""
        count = 1 if self.num_returns == DYNAMIC else max(self.num_returns, 0)
        return [return_object_id(self.task_id, i) for i in range(count)]

    @property
    def streaming(self) -> bool:
        return self.num_returns == STREAMING

    @property
    def dynamic(self) -> bool:
        return self.num_returns == DYNAMIC

    def dependencies(self) -> list[str]:
        return [a.ref for a in (*self.args, *self.kwargs.values()) if a.ref is not None]


def return_object_id(task_id: str, index: int) -> str:
    return f"{task_id}{index + 1:08x}"


def return_index(object_id: str) -> int:
    """The index of a task's return (or yielded value) in its id."""
    return int(object_id[-8:], 16) - 1


# TaskSpec.num_returns of a generator task or call (num_returns="streaming"): its values
# are objects made as it yields them; after the last, an end-of-stream marker
STREAMING = -1
END_OF_STREAM = "end_of_stream"  # the ErrorInfo kind of the marker
# ... of a dynamic generator (num_returns="dynamic"): one return (index 0), a
# DynamicObjectRefGenerator over the values it yielded, made once it is over: the
# i-th value is ``return_object_id(task_id, i + 1)`` (then its error, if it raised)
DYNAMIC = -2
# the method every actor has, as in Ray (``actor.__ray_ready__.remote()``: True once up)
READY_METHOD = "__ray_ready__"


def outcome(
    return_ids: list[str], made: list[ObjectLocation], error: ErrorInfo
) -> list[ObjectLocation]:
    """Every return of a task that failed with ``error`` after it made ``made`` (a
    generator with an int num_returns that raised, or yielded too few): those keep
    their values, the others stand for the error, as in Ray."""
    kept = {location.object_id: location for location in made}
    return [kept.get(oid) or ObjectLocation(oid, error=error) for oid in return_ids]


# -- messages: client -> daemon ---------------------------------------------------------


@dataclass(slots=True)
class Hello:
    role: str  # "driver" | "worker"
    pid: int
    worker_id: str | None = None
    namespace: str | None = None  # a driver's, from init(namespace=...)
    replay_of: str | None = None  # a driver of `cairn replay`: the job it re-runs
    log_to_driver: bool = True  # a driver: whether its workers' output is sent to it
    submission_id: str | None = None  # a driver a job submission started (its id)
    # a driver: servers of the log its job must not lie on (`cairn replay --without-server`)
    avoid_servers: tuple[int, ...] = ()


@dataclass(slots=True)
class RegisterFunction:
    function_id: str
    blob: bytes
    name: str


@dataclass(slots=True)
class SubmitTask:
    spec: TaskSpec


@dataclass(slots=True)
class SubmitDirectCall:
    """An actor call sent straight to the actor's worker (``worker_id``) by a caller on
    its node, and the same message to the daemon, which records it (the daemon does
    not send it on; see controlplane/node/actors.py, "Direct calls")."""

    spec: TaskSpec
    worker_id: str
    # where ref arguments are, when the caller knows (else the worker asks the daemon)
    args: list[ObjectLocation | None] = field(default_factory=list)
    kwargs: dict[str, ObjectLocation] = field(default_factory=dict)
    frame: bytes | None = None  # as received (read_message sets it): logged as it came


def submitted_spec(data: bytes) -> tuple[TaskSpec, bytes | None]:
    """The spec and, with the first task of a function, its code, from a ``submitted``
    event's data: a spec, a (spec, code) pair, or a direct call's frame as received."""
    decoded = decode_frame(data)
    if isinstance(decoded, tuple):
        return decoded[0], decoded[1]
    if isinstance(decoded, SubmitDirectCall):
        return decoded.spec, None
    if not isinstance(decoded, TaskSpec):
        raise ProtocolError(f"not a submitted task: {type(decoded).__name__}")
    return decoded, None


def bind_private_socket(path: str) -> socket.socket:
    """A Unix socket bound at ``path``, owner-only (0600) before anyone can reach it:
    bound in a fresh 0700 directory beside it, made 0600, then moved into place (the
    session directory may be traversable by others: 0711 when PostgreSQL runs as
    another user)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    private = tempfile.mkdtemp(dir=os.path.dirname(path))
    try:
        sock.bind(f"{private}/s")
        os.chmod(f"{private}/s", 0o600)
        os.replace(f"{private}/s", path)
    except BaseException:
        sock.close()
        raise
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return sock


def direct_socket_path(session_dir: str, worker_id: str) -> str:
    """Where an actor's worker listens for direct calls: in the session directory (mode
    0700, like the daemon's socket), named short for the 107-byte limit."""
    return f"{session_dir}/actor-{worker_id.rsplit('-', 1)[-1]}.sock"


@dataclass(slots=True)
class PushObjects:
    """Asks for ObjectsReady of these objects once each is ready: results of direct
    calls whose worker died before answering here (the daemon may have their answer)."""

    object_ids: list[str]


@dataclass(slots=True)
class WatchActor:
    """Asks once for the actor's direct route (reply: ActorRoute, when it is alive or
    will never have one)."""

    actor_id: str


@dataclass(slots=True)
class PutObject:
    """An object the client created (put, or a task's return): inline or in a segment
    the client already wrote and sealed."""

    location: ObjectLocation
    task_id: str | None = None
    durable: bool = False  # put(durable=True): kept on disk too, so it can be recovered


@dataclass(slots=True)
class ReserveShm:
    """Asks for room in the store for an object of ``size`` bytes; the reply is where
    to write it, ``(region, offset)``. The range is the asker's until it sends the
    object (PutObject, or a task's returns in TaskDone), gives it back (ReleaseShm), or
    its connection ends (then the node takes it back: a writer that died)."""

    request_id: int
    size: int


@dataclass(slots=True)
class ViewObject:
    """Asks where to read an object in the store: the reply is its location once it is
    there (restored or fetched first if it is not), and it stays there -- not spilled,
    not freed, its range not reused -- until the asker's view of it ends (ViewCounts).
    A location a process learned earlier may be stale: its object spilled since, its
    range given to another object."""

    request_id: int
    object_id: str
    timeout: float | None = None  # then the reply is a "timeout" error


@dataclass(slots=True)
class ViewCounts:
    """Views of objects in the store that began without a ViewObject (+1: a task's
    argument, whose location came with the task and is held for it meanwhile) or
    ended (-1: nothing built on the view's bytes lives any more)."""

    deltas: dict[str, int]


@dataclass(slots=True)
class ReleaseShm:
    """Gives back a range ReserveShm handed out and not used (the write failed)."""

    region: int
    offset: int


@dataclass(slots=True)
class GetObjects:
    request_id: int
    object_ids: list[str]
    timeout: float | None


@dataclass(slots=True)
class WaitObjects:
    request_id: int
    object_ids: list[str]
    num_returns: int
    timeout: float | None
    fetch_local: bool = True


@dataclass(slots=True)
class CancelTask:
    """ray.cancel; the reply is None, or the error of a cancel refused (force=True of
    an actor's call)."""

    request_id: int
    object_id: str
    force: bool
    recursive: bool


@dataclass(slots=True)
class CancelCall:
    """To an actor's worker: cancel this call of it (dropped if it has not begun, a
    running coroutine cancelled; a running sync call only marked, see is_canceled)."""

    task_id: str


@dataclass(slots=True)
class RefCounts:
    """Changes of how many holders this process has for objects: +1 when it first
    holds a ref to an object, -1 when its last one goes away."""

    deltas: dict[str, int]


@dataclass(slots=True)
class TaskDone:
    task_id: str
    attempt: int
    returns: list[ObjectLocation]
    # set when the task raised: every return is this error, but those in ``returns``
    # (made before it raised, by a generator with an int num_returns: ``outcome``)
    error: ErrorInfo | None = None
    # "xxh3:<hex>": an xxh3-128 of the return values' blob checksums (xxh3-64 of their
    # serialized bytes), in order: logged with `finished`
    # so that `cairn replay` can tell whether a re-run produced the same output
    output_digest: str | None = None
    direct: bool = False  # the call came straight from its caller (SubmitDirectCall)


@dataclass(slots=True)
class StreamItem:
    """Worker -> daemon: a generator task yielded its ``index``-th value (or raised
    there: ``location.error``), stored; the daemon makes it visible to the caller."""

    task_id: str
    attempt: int
    index: int
    location: ObjectLocation


@dataclass(slots=True)
class ReleaseStream:
    """Client -> daemon: the caller dropped its generator; the values from ``index`` on
    (those it never took, made or to come) are not its to hold."""

    task_id: str
    index: int


@dataclass(slots=True)
class StreamConsumed:
    """Client -> daemon -> the generator's worker: the caller took ``count`` values of
    a streaming generator with backpressure (TaskSpec.generator_backpressure)."""

    task_id: str
    count: int


@dataclass(slots=True)
class ActorOptions:
    """What the daemon keeps about an actor beyond its creation task."""

    class_name: str
    methods: dict[str, int]
    name: str | None = None
    namespace: str | None = None
    detached: bool = False
    max_restarts: int = 0  # -1: restart forever
    max_task_retries: int = 0  # -1: re-send an interrupted call forever
    max_concurrency: int = 1  # calls running at once (threads, or asyncio tasks)
    # after a restart, re-run the calls that ran before (from the log) to rebuild state
    replay_calls_on_restart: bool = False
    # with replay: every this many calls the actor's __cairn_save__() state is logged,
    # and a restart loads it (__cairn_load__) and replays only the calls after it
    checkpoint_interval: int = 0
    # concurrency_groups: name -> how many calls of the group run at once (beside the
    # default group's max_concurrency); read with getattr (options logged before it)
    concurrency_groups: dict[str, int] | None = None
    method_groups: dict[str, str] | None = None  # method -> its group (@method's)
    # method -> its @method's max_task_retries, retry_exceptions (and the classes,
    # cloudpickled: retry_exception_types); read with getattr (options logged before it)
    method_options: dict[str, dict[str, Any]] | None = None
    # method -> its @method(_generator_backpressure_num_objects=...); likewise
    method_backpressure: dict[str, int] | None = None
    # calls one handle may have pending (not finished) before the next is refused
    # (Ray's PendingCallsLimitExceeded); -1: no limit. Read with getattr (logged before it)
    max_pending_calls: int = -1


def calls_at_once(options: ActorOptions) -> int:
    """How many calls of an actor can run at once, over all its concurrency groups."""
    groups = getattr(options, "concurrency_groups", None) or {}
    return options.max_concurrency + sum(groups.values())


@dataclass(slots=True)
class CreatePlacementGroup:
    """Reserves ``bundles`` (resource amounts) together; ``ready_object_id`` becomes
    ready (True) once they are reserved. Owned by the sending client's job."""

    pg_id: str
    bundles: list[dict[str, float]]
    strategy: str
    name: str
    job_id: str
    ready_object_id: str
    detached: bool = False


@dataclass(slots=True)
class RemovePlacementGroup:
    pg_id: str


@dataclass(slots=True)
class PlacementGroupTable:
    """Reply: {pg id: entry} of every placement group, or the one named by ``pg_id``;
    with ``name``, the entry of the live group of that name (None if none)."""

    request_id: int
    pg_id: str | None = None
    name: str | None = None


@dataclass(slots=True)
class ReserveActorName:
    """Claims ``name`` in a namespace for a new actor before it is created. Reply: None
    when claimed; (actor_id, ActorOptions) of the holder with ``get_if_exists``."""

    request_id: int
    actor_id: str
    name: str
    namespace: str | None
    job_id: str
    get_if_exists: bool


@dataclass(slots=True)
class GetActor:
    """Reply: (actor_id, ActorOptions) of the live actor with that name, or an error."""

    request_id: int
    name: str
    namespace: str | None
    job_id: str


@dataclass(slots=True)
class ListNamedActors:
    """Reply: [(namespace, name)] of the live named actors, in the job's namespace or
    (``all_namespaces``) in every one."""

    request_id: int
    job_id: str
    all_namespaces: bool
    namespace: str | None = None  # the job's (a task's on another node than its driver's)


@dataclass(slots=True)
class PrepareRuntimeEnv:
    """A job's runtime_env with ``config["eager_install"]`` (Ray's default): its node sets
    it up now, not at the first task that needs it."""

    runtime_env: dict[str, Any]


@dataclass(slots=True)
class KillActor:
    actor_id: str
    no_restart: bool


@dataclass(slots=True)
class ReportLost:
    """A client found an object's segment gone (removed from /dev/shm behind our back)."""

    object_id: str
    reason: str


@dataclass(slots=True)
class ClusterInfoRequest:
    request_id: int


@dataclass(slots=True)
class MemorySummaryRequest:
    """Reply: this node's object store, object by object (dataplane/memory_summary.py)."""

    request_id: int


@dataclass(slots=True)
class FlushOutput:
    """A driver about to leave: the node reads what its workers printed so far and
    sends it on before the Reply (so the last lines of a job are not lost)."""

    request_id: int


@dataclass(slots=True)
class LogSeen:
    """How far in the log a process read it itself (the state API): its daemon appends
    what it asks for next past ``position``, so that on a log on several servers an
    effect of what it read is ordered after it, as on one (controlplane/README.md, "A
    log on several servers"). Sent after each state query."""

    position: int


@dataclass(slots=True)
class ClusterNodesRequest:
    """Reply: a NodeSummary of every node of the cluster, alive or dead, oldest
    registration first (``ray.nodes()``, ``cluster_resources()`` read it)."""

    request_id: int


@dataclass(slots=True)
class NodeSummary:
    """One node as the cluster knows it: from the log's node events, or from the daemon
    itself for its own node (its resources as they are now, not as last logged)."""

    node_id: str
    alive: bool
    ip: str  # the address its gRPC service listens on; 127.0.0.1 in a private cluster
    port: int  # of that service (tasks, calls and objects between nodes); 0: none
    hostname: str
    socket: str  # its daemon's socket for drivers and workers, on its own machine
    head: bool
    resources: dict[str, float]  # totals
    available: dict[str, float]  # free now (another node: at its latest heartbeat)
    death_cause: str = ""
    death_expected: bool = False  # it stopped on purpose (shutdown), not lost
    labels: dict[str, str] = field(default_factory=dict)  # with ray.io/node-id


# -- messages: daemon -> client ---------------------------------------------------------


@dataclass(slots=True)
class Welcome:
    node_id: str
    job_id: str
    session_dir: str
    gcs_url: str
    resources: dict[str, float]
    namespace: str = ""  # a driver's namespace (an anonymous one if it gave none)
    labels: dict[str, str] = field(default_factory=dict)  # its node's (with its id)


@dataclass(slots=True)
class ExecuteTask:
    spec: TaskSpec
    attempt: int
    function_blob: bytes | None  # sent with the first task of a function to a worker
    args: list[ObjectLocation | None] = field(default_factory=list)  # resolved ref args
    kwargs: dict[str, ObjectLocation] = field(default_factory=dict)
    gpu_ids: list[str] = field(default_factory=list)  # the GPUs the task may use
    restarts: int = 0  # an actor's constructor: how often the actor restarted before


@dataclass(slots=True)
class ObjectsReady:
    """Pushed to the client that submitted a task when its returns become ready (and
    durable): the client answers get and wait for them without asking again."""

    locations: list[ObjectLocation]


@dataclass(slots=True)
class ActorRoute:
    """Where to send an actor's calls directly: its worker and that worker's socket;
    None for both: through the daemon (the actor is on another node, replays its calls
    on restart, or is dead)."""

    actor_id: str
    worker_id: str | None
    socket_path: str | None


@dataclass(slots=True)
class Notice:
    """Pushed to a client: something it should be told about its work (e.g. a task of
    its that no node can run), shown as a warning."""

    text: str


@dataclass(slots=True)
class OutputLines:
    """Lines one worker printed for a job, as the node's output monitor read them
    (controlplane/node/worker_output.py); pushed to the job's driver in ``Output``."""

    ip: str  # the worker's node
    pid: int
    name: str  # what ran: the task's name, or the actor's
    stream: str  # "stdout" or "stderr"
    lines: list[str]


@dataclass(slots=True)
class Output:
    """Pushed to a driver: what its job's workers printed (dataplane/output_lines.py
    shows it)."""

    batches: list[OutputLines]


@dataclass(slots=True)
class MetricPoint:
    """What one process recorded of one user metric and tag set since its last report
    (dataplane/user_metrics.py): a counter's increase, a gauge's last value, or a
    histogram's new observations (``buckets``: a count per bucket, the last one past
    every boundary; ``value``: their sum)."""

    kind: str  # "counter", "gauge" or "histogram"
    name: str
    description: str
    tags: tuple[tuple[str, str], ...]  # sorted by key
    value: float
    boundaries: tuple[float, ...] = ()
    buckets: tuple[int, ...] = ()
    count: int = 0


@dataclass(slots=True)
class MetricsReport:
    """A process's user metrics since its last report, sent about once a second (never
    one message per recorded value); its node keeps the sums (controlplane/node/metrics.py)."""

    points: list[MetricPoint]


@dataclass(slots=True)
class Reply:
    request_id: int
    value: Any = None
    error: str | None = None


@dataclass(slots=True)
class Shutdown:
    reason: str


# -- framing -------------------------------------------------------------------------


def encode(message: object) -> bytes:
    body = pickle.dumps(message, protocol=5)
    return _FRAME.pack(len(body), xxhash.xxh3_64_intdigest(body)) + body


def decode_frame(frame: bytes) -> object:
    """A message from one whole frame, as ``encode`` made it (e.g. stored in the log)."""
    size = len(frame)
    if size >= _FRAME.size:
        length, checksum = _FRAME.unpack_from(frame)
        if length == size - _FRAME.size:
            return decode(frame[_FRAME.size :], checksum)
    if size >= _LEGACY_FRAME.size and _LEGACY_FRAME.unpack_from(frame)[0] == size - 4:
        return decode(frame[_LEGACY_FRAME.size :])
    raise ProtocolError(f"not one whole frame ({size} bytes)")


def decode(body: bytes, checksum: int | None = None) -> object:
    """The message in a frame's body, checked against the frame's ``checksum`` (None:
    a frame from before checksums)."""
    if checksum is not None and (actual := xxhash.xxh3_64_intdigest(body)) != checksum:
        raise ProtocolError(
            f"damaged message: its {len(body):,} bytes do not match their checksum "
            f"(xxh3-64 {actual:016x}, sent as {checksum:016x})"
        )
    try:
        return pickle.loads(body)
    except Exception as exc:
        raise ProtocolError(f"corrupt message ({len(body)} bytes): {exc!r}") from exc


async def read_message(reader: asyncio.StreamReader) -> object:
    """The next message; EOFError at a clean end of stream."""
    try:
        header = await reader.readexactly(_FRAME.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EOFError from exc
        raise ProtocolError("truncated frame header") from exc
    length, checksum = _FRAME.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(f"truncated frame: {len(exc.partial)} of {length} bytes") from exc
    message = decode(body, checksum)
    if isinstance(message, SubmitDirectCall) and not message.args and not message.kwargs:
        message.frame = header + body  # (with argument values, the log gets the spec alone)
    return message


class SyncChannel:
    """A blocking, thread-safe sender plus a reader for one Unix socket connection."""

    def __init__(self, path: str | None = None, *, sock: socket.socket | None = None) -> None:
        """Connects to ``path``, or wraps ``sock`` (a connection already accepted)."""
        if sock is None:
            if path is None:
                raise TypeError("SyncChannel needs a socket path or a connected sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
        self.sock = sock
        self._send_lock = threading.Lock()
        self._file = self.sock.makefile("rb", buffering=1 << 16)

    def send(self, message: object) -> None:
        self.send_encoded(encode(message))

    def send_encoded(self, data: bytes) -> None:
        """Sends a frame ``encode`` made (one message sent to two peers is pickled once)."""
        with self._send_lock:
            self.sock.sendall(data)

    def receive(self) -> object:
        header = self._file.read(_FRAME.size)
        if not header:
            raise EOFError
        if len(header) < _FRAME.size:
            raise ProtocolError("truncated frame header")
        length, checksum = _FRAME.unpack(header)
        if length > MAX_FRAME:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit")
        body = self._file.read(length)
        if len(body) < length:
            raise ProtocolError(f"truncated frame: {len(body)} of {length} bytes")
        return decode(body, checksum)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
