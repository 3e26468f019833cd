"""The core client: one process's connection to its node daemon, used by drivers and
workers alike (the SDK is a thin layer over it).

A reader thread receives replies and, in a worker, the tasks to execute. Reference
counting: each ObjectRef made or dropped in this process appends to a lock-free queue
(safe from ``__del__``); the queue is folded into per-object counts, and only the 0->1
and 1->0 transitions are sent to the daemon: new holds before any later message, so a
borrowed ref is registered before the task or object that lent it can be released;
releases just after it, so that a ref a task drops as it returns it inside its result
is pinned by that result before this process lets it go.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NoReturn

from dataplane import protocol as p
from dataplane import shm, user_metrics
from dataplane.output_lines import OutputPrinter
from dataplane.ref_counts import RefCounts
from dataplane.serialization import (
    ChecksumError,
    SerializationError,
    Serialized,
    deserialize,
    verify_read_max_bytes,
)

log = logging.getLogger("cairn")
_FLUSH_INTERVAL_S = 0.05
# set in the driver a job submission starts (controlplane/jobs.py): its submission id
SUBMISSION_ID_ENV = "CAIRN_SUBMISSION_ID"
# ... and its runtime_env (JSON), the job-level one of init() without a runtime_env
JOB_RUNTIME_ENV_ENV = "CAIRN_JOB_RUNTIME_ENV"


class ObjectMissingError(LookupError):
    """An object's segment is gone; the daemon has been told (it records it lost)."""


class DaemonError(RuntimeError):
    """The daemon refused a request; ``kind`` says why (e.g. "timeout", "store_full")."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True)
class _Waiter:
    pending: set[str]  # objects not pushed here yet
    needed: int  # how many more of them the waiting thread needs


@dataclass(slots=True)
class _Route:
    """How this process sends its calls to one actor (see submit_actor_call)."""

    actor_id: str
    worker_id: str | None = None
    channel: p.SyncChannel | None = None  # straight to the actor's worker
    watching: bool = False  # asked the daemon for the route, no answer yet
    never: bool = False  # always through the daemon (another node, replaying, dead)
    via_daemon: set[str] = field(default_factory=set)  # returns of such calls not in yet
    # a call without returns went through the daemon: its end cannot be seen here, so
    # later calls keep going that way (to keep this caller's order)
    blind: bool = False
    direct: dict[str, list[str]] = field(default_factory=dict)  # task id -> returns


class CoreClient:
    def __init__(
        self,
        socket_path: str,
        role: str,
        worker_id: str | None = None,
        namespace: str | None = None,
        replay_of: str | None = None,
        *,
        log_to_driver: bool = True,
        avoid_servers: tuple[int, ...] = (),
    ) -> None:
        self.channel = p.SyncChannel(socket_path)
        self.role = role
        self.worker_id = worker_id
        # calls for this worker to run, with the direct caller to answer (None: the
        # daemon sent it); None ends the worker
        self.tasks: queue.Queue[tuple[p.ExecuteTask, p.SyncChannel | None] | None] = queue.Queue()
        # a worker's: ray.cancel of an actor call it was sent (dataplane/worker.py)
        self.on_cancel_call: Callable[[str], None] = lambda _task_id: None
        # ... and how many values of a streaming generator it runs its caller took
        self.on_stream_consumed: Callable[[str, int], None] = lambda _task_id, _count: None
        self._routes: dict[str, _Route] = {}  # actor id -> how calls go there
        self._routes_lock = threading.Lock()
        self._call_route: dict[str, _Route] = {}  # return id of a call not in yet -> route
        self._direct_ids: set[str] = set()  # those whose call went straight to the worker
        self._route_breaks = 0  # direct routes lost so far (wakes waiters to re-decide)
        self._requests: dict[int, Future[Any]] = {}
        self._request_ids = itertools.count(1)
        self._refs = RefCounts(self._released)
        self._flush_lock = threading.Lock()
        self._registered_functions: set[str] = set()
        # The local object store: ready objects this process holds refs to (values
        # inline when small), in the order they became ready here. Guarded by _ready.
        self._local: dict[str, p.ObjectLocation] = {}
        self._owned_pending: set[str] = set()
        self._ready = threading.Condition()
        self._waiters: list[_Waiter] = []  # threads waiting for pushed objects
        self._closed = threading.Event()
        self._verify_up_to = verify_read_max_bytes()
        self._gone_why = "the node daemon went away"
        self.output = OutputPrinter()  # (a driver's: what its workers print)
        # a driver started by a job submission (controlplane/jobs.py) names it
        submission = (os.environ.get(SUBMISSION_ID_ENV) or None) if role == "driver" else None
        self.channel.send(
            p.Hello(
                role,
                os.getpid(),
                worker_id,
                namespace,
                replay_of,
                log_to_driver,
                submission,
                avoid_servers,
            )
        )
        welcome = self.channel.receive()
        if not isinstance(welcome, p.Welcome):
            raise p.ProtocolError(f"expected Welcome from the node daemon, got {welcome!r}")
        self.welcome = welcome
        self._reader = threading.Thread(target=self._read_loop, name="cairn-client", daemon=True)
        self._reader.start()
        self._flusher = threading.Thread(target=self._flush_loop, name="cairn-refs", daemon=True)
        self._flusher.start()

    # -- requests -------------------------------------------------------------------

    def send(self, message: object) -> None:
        """Sends a message after any pending reference-count changes."""
        # A request for room names no object: what this process let go of goes first,
        # so a put that follows the release of one as large reuses its room.
        self.send_encoded(p.encode(message), releases_first=isinstance(message, p.ReserveShm))

    def send_encoded(self, data: bytes, *, releases_first: bool = False) -> None:
        """``send`` of a frame ``p.encode`` made: after the pending holds, and before
        the pending releases (a message may lend what they release) unless
        ``releases_first``."""
        if self._closed.is_set():
            raise ConnectionError(f"the connection to the node daemon is closed: {self._gone_why}")
        with self._flush_lock:
            holds, releases = self._refs.frames()
            if releases_first:
                self.channel.send_encoded(holds + releases + data)  # one write
            else:
                self.channel.send_encoded(holds + data + releases)

    def request(self, make: Any, timeout: float | None = None) -> Any:
        """Sends ``make(request_id)`` and blocks for the daemon's Reply (TimeoutError
        after ``timeout``)."""
        request_id = next(self._request_ids)
        future: Future[Any] = Future()
        self._requests[request_id] = future
        try:
            self.send(make(request_id))
            reply: p.Reply = future.result(timeout)
        finally:
            self._requests.pop(request_id, None)
        if reply.error is not None:
            kind, _, message = reply.error.partition(":")
            raise DaemonError(kind, message.strip())
        return reply.value

    def register_function(self, function_id: str, blob: bytes, name: str) -> None:
        if function_id not in self._registered_functions:
            self.send(p.RegisterFunction(function_id, blob, name))
            self._registered_functions.add(function_id)

    def submit(self, spec: p.TaskSpec) -> None:
        self.expect_owned(spec.return_ids())
        self.send(p.SubmitTask(spec))

    def submit_actor_call(self, spec: p.TaskSpec) -> None:
        """Sends an actor call straight to the actor's worker when this process has its
        route (same node, actor alive), else through the daemon. Straight calls also go
        to the daemon (the same frame, pickled once), which records them; the worker
        answers here directly. A caller's calls keep their order across the two ways:
        it switches to the direct way only once every call it sent through the daemon
        has its results here, and back only when the worker died, whose unanswered
        calls the daemon then holds ahead of anything sent after."""
        return_ids = spec.return_ids()
        self.expect_owned(return_ids)
        assert spec.actor_id is not None
        with self._routes_lock:
            route = self._routes.get(spec.actor_id)
            if route is None:
                route = self._routes[spec.actor_id] = _Route(spec.actor_id)
                # $CAIRN_DIRECT_ACTOR_CALLS=0 (read at a process's first call to each
                # actor): its calls go through the daemon, and their results are
                # visible only once their events are durable
                route.never = os.environ.get("CAIRN_DIRECT_ACTOR_CALLS", "1") == "0"
            if not route.never:
                for object_id in return_ids:
                    self._call_route[object_id] = route
            channel = route.channel
            # (a generator's values come through the daemon: so does the call; and one
            # that may be retried when it raises: the daemon decides that)
            if (
                channel is None
                or route.via_daemon
                or route.blind
                or spec.streaming
                or spec.retry_exceptions
            ):
                if not route.never:
                    route.via_daemon.update(return_ids)
                    route.blind = route.blind or not return_ids
                    if channel is None and not route.watching:
                        route.watching = True
                        self.send(p.WatchActor(spec.actor_id))
                self.send(p.SubmitTask(spec))
                return
            assert route.worker_id is not None
            route.direct[spec.task_id] = return_ids
            self._direct_ids.update(return_ids)
            args, kwargs = self._known_locations(spec)
            data = p.encode(p.SubmitDirectCall(spec, route.worker_id, args, kwargs))
            self.send_encoded(data)  # the daemon first: it pins what the call uses
        try:
            channel.send_encoded(data)
        except OSError:  # the worker is gone: the daemon settles the call
            self._route_broken(route, channel)

    def _known_locations(
        self, spec: p.TaskSpec
    ) -> tuple[list[p.ObjectLocation | None], dict[str, p.ObjectLocation]]:
        """Where a call's ref arguments are, for those in this process's store and on
        this node (so the worker need not ask the daemon)."""
        if not spec.dependencies():
            return [], {}
        with self._ready:
            args = [self._readable_here(a.ref) for a in spec.args]
            kwargs = {k: self._readable_here(a.ref) for k, a in spec.kwargs.items()}
        return args, {k: loc for k, loc in kwargs.items() if loc is not None}

    def _readable_here(self, object_id: str | None) -> p.ObjectLocation | None:
        location = self._local.get(object_id) if object_id is not None else None
        return location if location is not None and location.remote is None else None

    def kill_actor(self, actor_id: str, no_restart: bool) -> None:
        """Asks the daemon to kill the actor. This process's calls stop going straight
        to it first, so a call made after kill() reaches the daemon after the kill."""
        with self._routes_lock:
            route = self._routes.get(actor_id)
            channel = route.channel if route is not None else None
        if route is not None and channel is not None:
            self._route_broken(route, channel)
        self.send(p.KillActor(actor_id, no_restart))

    def _route_given(self, message: p.ActorRoute) -> None:
        """The daemon's answer to WatchActor: connect to the actor's worker."""
        with self._routes_lock:
            route = self._routes.get(message.actor_id)
            if route is None:
                return
            route.watching = False
            if message.socket_path is None:
                route.never = True
                return
            try:
                channel = p.SyncChannel(message.socket_path)
            except OSError:  # it died meanwhile: asked again at the next call
                return
            route.channel, route.worker_id = channel, message.worker_id
        threading.Thread(
            target=self._read_direct, args=(route, channel), name="cairn-direct", daemon=True
        ).start()

    def _read_direct(self, route: _Route, channel: p.SyncChannel) -> None:
        """Answers from an actor's worker to this process's direct calls."""
        try:
            while True:
                done = channel.receive()
                if not isinstance(done, p.TaskDone):
                    raise p.ProtocolError(f"unexpected message {type(done).__name__}")
                with self._routes_lock:
                    return_ids = route.direct.pop(done.task_id, None)
                if return_ids is None:
                    continue
                if done.error is None:
                    self._remember(done.returns)
                else:
                    self._remember(p.outcome(return_ids, done.returns, done.error))
        except (EOFError, OSError):
            pass
        except p.ProtocolError as exc:
            log.warning("closing a direct route to actor %s: %s", route.actor_id, exc)
        self._route_broken(route, channel)

    def _route_broken(self, route: _Route, channel: p.SyncChannel) -> None:
        """The actor's worker went away: its unanswered calls are the daemon's now (it
        re-sends or fails them, and is asked to push the results of those the worker
        answered to it but not here), and so are later calls until those are in and the
        daemon gives the new worker's route."""
        channel.close()
        with self._routes_lock:
            if route.channel is not channel:
                return
            route.channel = route.worker_id = None
            unanswered = []
            for return_ids in route.direct.values():
                route.blind = route.blind or not return_ids
                for object_id in return_ids:
                    self._direct_ids.discard(object_id)
                    if object_id in self._call_route:
                        route.via_daemon.add(object_id)
                        unanswered.append(object_id)
            route.direct.clear()
        if unanswered and not self._closed.is_set():
            with contextlib.suppress(OSError):
                self.send(p.PushObjects(unanswered))
        with self._ready:
            self._route_breaks += 1
            self._ready.notify_all()

    def expect_owned(self, object_ids: list[str]) -> None:
        """Objects this process owns that the daemon will push here once ready."""
        for object_id in object_ids:
            self.own_ref(object_id)
        with self._ready:
            self._owned_pending.update(object_ids)

    def store(
        self, object_id: str, value: Serialized, contained: tuple[str, ...] = ()
    ) -> p.ObjectLocation:
        """Places a serialized value: inline if small, else in this node's store (room
        reserved with the daemon first, so a full store refuses cleanly)."""
        size = value.total_size
        if size <= shm.INLINE_LIMIT:
            return p.ObjectLocation(
                object_id, inline=value.to_bytes(), size=size, contained=contained
            )
        region, offset = self.request(lambda rid: p.ReserveShm(rid, size))
        location = p.ObjectLocation(
            object_id, region=region, offset=offset, size=size, contained=contained
        )
        try:
            shm.write_object(self.welcome.node_id, location, value)
        except BaseException:
            self.send(p.ReleaseShm(region, offset))  # give the room back
            raise
        return location

    def put(
        self,
        object_id: str,
        value: Serialized,
        task_id: str | None,
        contained: tuple[str, ...] = (),
        durable: bool = False,
    ) -> None:
        """Stores a value under ``object_id``; this process holds it from now on."""
        location = self.store(object_id, value, contained)
        self.own_ref(object_id)
        self.send(p.PutObject(location, task_id, durable))
        with self._ready:
            self._local[object_id] = location

    def get_locations(self, object_ids: list[str], timeout: float | None) -> list[p.ObjectLocation]:
        """Where the objects are, once all are ready. Answered here when they are in
        the local store or will be pushed to it (a driver's own results; any process's
        direct actor calls); otherwise the daemon is asked (a worker always asks when
        it must wait for others: the daemon then lends its CPU out, so nested tasks
        cannot deadlock)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while True:
                missing = [oid for oid in object_ids if oid not in self._local]
                if not missing:
                    return [self._local[oid] for oid in object_ids]
                if not self._pushed_here(missing):
                    break
                breaks = self._route_breaks
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._await_pushed(set(missing), len(set(missing)), left, breaks)
                if self._closed.is_set():
                    missing = [oid for oid in object_ids if oid not in self._local]
                    if missing:
                        raise DaemonError("disconnected", self._gone_why)
                elif self._route_breaks == breaks and not all(
                    oid in self._local for oid in object_ids
                ):
                    raise DaemonError("timeout", "get timed out")
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        fetched = self.request(lambda rid: p.GetObjects(rid, missing, left))
        self._remember(fetched)
        found = dict(zip(missing, fetched, strict=True))
        with self._ready:
            return [found.get(oid) or self._local[oid] for oid in object_ids]

    def _pushed_here(self, missing: list[str]) -> bool:
        """Whether all of ``missing`` will be pushed to this process (call with _ready
        held): a driver's own results, or results of calls sent straight to an actor."""
        if self.role == "driver" and self._owned_pending.issuperset(missing):
            return True
        return self._direct_ids.issuperset(missing)

    def fetch_location(self, object_id: str, timeout: float | None) -> p.ObjectLocation:
        """Asks the node for an object that what this process knows of does not give
        (it is on another node, or its bytes were found gone): the node fetches or
        rebuilds it, and answers once it is in this node's store."""
        with self._ready:
            self._local.pop(object_id, None)
        (location,) = self.request(lambda rid: p.GetObjects(rid, [object_id], timeout))
        self._remember([location])
        return location

    def wait(
        self,
        object_ids: list[str],
        num_returns: int,
        timeout: float | None,
        fetch_local: bool = True,
    ) -> list[str]:
        """The first ``num_returns`` of the objects to be ready, in the order they
        became ready (or those ready when ``timeout`` passed)."""
        with self._ready:
            pending = [oid for oid in object_ids if oid not in self._local]
            if self.role == "driver" and self._owned_pending.issuperset(pending):
                needed = num_returns - (len(object_ids) - len(pending))
                if needed > 0:
                    self._await_pushed(set(pending), needed, timeout)
                order = {oid: n for n, oid in enumerate(self._local)}
                ready = sorted((oid for oid in object_ids if oid in order), key=order.__getitem__)
                return ready[:num_returns]
        return self.request(
            lambda rid: p.WaitObjects(rid, object_ids, num_returns, timeout, fetch_local)
        )

    def _await_pushed(
        self, pending: set[str], needed: int, timeout: float | None, breaks: int = -1
    ) -> None:
        """Waits (with _ready held) until ``needed`` of ``pending`` objects have been
        pushed here, the timeout passes, the connection closes, or (``breaks`` given) a
        direct route breaks. The reader wakes this thread only when that count is
        reached, not on every arrival."""
        waiter = _Waiter(pending, needed)
        self._waiters.append(waiter)
        try:
            self._ready.wait_for(
                lambda: (
                    waiter.needed <= 0
                    or self._closed.is_set()
                    or (breaks >= 0 and self._route_breaks != breaks)
                ),
                timeout,
            )
        finally:
            self._waiters.remove(waiter)

    def _remember(self, locations: list[p.ObjectLocation]) -> None:
        """Adds ready objects to the local store, if this process still holds them."""
        if self._call_route:  # results of actor calls: their route may switch now
            with self._routes_lock:
                for location in locations:
                    route = self._call_route.pop(location.object_id, None)
                    if route is not None:
                        route.via_daemon.discard(location.object_id)
        with self._ready:
            for location in locations:
                object_id = location.object_id
                self._direct_ids.discard(object_id)
                self._owned_pending.discard(object_id)
                if self._refs.holds(object_id) and object_id not in self._local:
                    self._local[object_id] = location
            wake = False
            for waiter in self._waiters:
                if waiter.needed > 0:
                    for location in locations:
                        if location.object_id in waiter.pending:
                            waiter.pending.discard(location.object_id)
                            waiter.needed -= 1
                    wake = wake or waiter.needed <= 0
            if wake:
                self._ready.notify_all()

    def cluster_info(self) -> dict[str, Any]:
        return self.request(lambda rid: p.ClusterInfoRequest(rid))

    def cluster_nodes(self) -> list[p.NodeSummary]:
        """Every node of the cluster, alive or dead (see ClusterNodesRequest)."""
        nodes: list[p.NodeSummary] = self.request(lambda rid: p.ClusterNodesRequest(rid))
        return nodes

    def read_value(
        self,
        location: p.ObjectLocation,
        *,
        task_argument: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """The value at a location (errors are the caller's to interpret). A value in
        the store is read where the daemon says it is now (``ViewObject``; a
        ``task_argument``'s location came with its task and is current) and stays there
        -- viewed, so neither spilled nor freed, its range never reused under a reader
        -- for as long as anything deserialized from its bytes lives; DaemonError
        "timeout" if it is not in the store (being restored) within ``timeout``. Bytes
        that do not match their checksum are never deserialized: the object is reported
        lost (the node rebuilds it when it can) and ObjectMissingError raised."""
        if location.inline is not None:
            try:
                return deserialize(location.inline)
            except ChecksumError as exc:
                self._lost(location, _mismatch(location.object_id, exc))
        object_id = location.object_id
        if task_argument:  # held for the task meanwhile: the view is registered behind
            self._refs.view(object_id)
        else:  # where it is now, held there while viewed (a known location may be stale)
            location = self.request(lambda rid: p.ViewObject(rid, object_id, timeout))
            if location.error is not None:
                raise ObjectMissingError(location.error.message)
            if location.inline is not None:  # (rebuilt small, from the log)
                return self.read_value(location)
        try:
            tracked = shm.tracked_bytes(self.welcome.node_id, location)
        except shm.ObjectBytesGoneError as exc:
            self._unview(object_id)
            self._lost(location, str(exc))
        weakref.finalize(tracked, self._unview, object_id)
        check = location.size <= self._verify_up_to
        try:
            return deserialize(memoryview(tracked).cast("B").toreadonly(), check=check)
        except ChecksumError as exc:
            self._lost(location, _mismatch(location.object_id, exc))
        except SerializationError as exc:  # its framing is damaged: never a wrong value
            self._lost(location, f"its bytes are corrupt ({exc})")

    def _lost(self, location: p.ObjectLocation, reason: str) -> NoReturn:
        """The bytes of an object are gone or damaged: the node is told (it rebuilds the
        object when it can) and the caller may ask for it again."""
        with self._ready:
            self._local.pop(location.object_id, None)
        self.send(p.ReportLost(location.object_id, reason))
        if reason.startswith(f"object {location.object_id}"):
            raise ObjectMissingError(reason)
        raise ObjectMissingError(f"object {location.object_id} is lost: {reason}")

    # -- reference counting -----------------------------------------------------------

    def own_ref(self, object_id: str) -> None:
        self._refs.own(object_id)

    def add_ref(self, object_id: str) -> None:
        self._refs.add(object_id)

    def remove_ref(self, object_id: str) -> None:
        if not self._closed.is_set():
            self._refs.remove(object_id)

    def _unview(self, object_id: str) -> None:
        if not self._closed.is_set():
            self._refs.unview(object_id)

    def _released(self, object_id: str) -> None:
        with self._ready:
            self._local.pop(object_id, None)
            self._owned_pending.discard(object_id)

    def _send_ref_changes(self) -> None:
        """Sends what the queued ref changes add up to (call with _flush_lock held)."""
        holds, releases = self._refs.frames()
        if holds or releases:
            self.channel.send_encoded(holds + releases)

    def _flush_loop(self) -> None:
        report_at = time.monotonic() + user_metrics.REPORT_INTERVAL_S
        while not self._closed.wait(_FLUSH_INTERVAL_S):
            try:
                if self._refs:
                    with self._flush_lock:
                        self._send_ref_changes()
                if user_metrics.BUFFER and time.monotonic() >= report_at:
                    report_at = time.monotonic() + user_metrics.REPORT_INTERVAL_S
                    self._report_metrics()
            except OSError:
                return

    def _report_metrics(self) -> None:
        """Sends the user metrics recorded since the last report (sdk.util.metrics)."""
        points = user_metrics.BUFFER.take()
        if points:
            self.send(p.MetricsReport(points))

    # -- the reader -------------------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while True:
                message = self.channel.receive()
                if isinstance(message, p.Reply):
                    future = self._requests.get(message.request_id)
                    if future is not None:
                        future.set_result(message)
                elif isinstance(message, p.ObjectsReady):
                    self._remember(message.locations)
                elif isinstance(message, p.Output):
                    self.output.show(message)
                elif isinstance(message, p.Notice):
                    log.warning("%s", message.text)
                elif isinstance(message, p.ExecuteTask):
                    self.tasks.put((message, None))
                elif isinstance(message, p.CancelCall):
                    self.on_cancel_call(message.task_id)
                elif isinstance(message, p.StreamConsumed):
                    self.on_stream_consumed(message.task_id, message.count)
                elif isinstance(message, p.ActorRoute):
                    self._route_given(message)
                elif isinstance(message, p.Shutdown):
                    self._gone_why = message.reason
                    break
        except (EOFError, OSError, p.ProtocolError):
            pass
        finally:
            self._closed.set()
            with self._ready:
                self._ready.notify_all()  # waiters for pushed objects: none will come
            for future in list(self._requests.values()):
                if not future.done():
                    future.set_result(p.Reply(0, error=f"disconnected: {self._gone_why}"))
            self.tasks.put(None)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def flush_output(self, timeout: float = 2.0) -> None:
        """A driver's last lines of its workers' output, shown before it leaves."""
        if self.role != "driver" or self._closed.is_set():
            return
        with contextlib.suppress(Exception):  # (the daemon may be gone: nothing to show)
            self.request(p.FlushOutput, timeout)
        self.output.flush(everything=True)

    def close(self) -> None:
        if not self._closed.is_set():
            with contextlib.suppress(OSError):
                self._report_metrics()
            with contextlib.suppress(OSError), self._flush_lock:
                self._send_ref_changes()
        self._closed.set()
        self.channel.close()
        if (welcome := getattr(self, "welcome", None)) is not None:
            shm.forget(welcome.node_id)  # the node's regions, unmapped once unused
        with self._routes_lock:
            channels = [r.channel for r in self._routes.values() if r.channel is not None]
        for channel in channels:
            channel.close()


def _mismatch(object_id: str, exc: ChecksumError) -> str:
    return f"object {object_id}'s bytes do not match their checksum: {exc}"
