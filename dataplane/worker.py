"""A worker process: connects to its node daemon, then executes the tasks it is sent,
one at a time, reading arguments from the store and writing results into it.

Run as ``python -m dataplane.worker SOCKET WORKER_ID [PARENT_PID]``; the daemon starts and replaces
workers. A task cancelled without force gets KeyboardInterrupt (the daemon sends
SIGINT), which is reported as cancellation.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import ctypes
import inspect
import os
import queue
import signal
import socket
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

import cloudpickle
import xxhash

from dataplane import context
from dataplane import protocol as p
from dataplane.begun_calls import BegunCalls, begun_calls_path
from dataplane.client import CoreClient, DaemonError, ObjectMissingError
from dataplane.exceptions import ObjectStoreFullError
from dataplane.output_lines import OutputMarks, rotate_when_full
from dataplane.serialization import (
    SerializationError,
    Serialized,
    deserialize,
    serialize_with_refs,
)


class Worker:
    def __init__(self, client: CoreClient) -> None:
        self.client = client
        self.functions: dict[str, Callable[..., Any]] = {}
        self._methods: dict[str, Any] = {}  # the actor class's attributes, by name
        self.actor: Any = None  # the instance, in a worker dedicated to an actor
        self.actor_gpu_ids: tuple[str, ...] = ()  # the GPUs given to that actor
        self.actor_creation: p.ExecuteTask | None = None  # how that actor was made
        # For an async actor: hands a call to its event loop. None: calls run in this
        # thread (and, in a threaded actor, in max_concurrency - 1 more threads that
        # take calls from the same queue).
        self._concurrently: Callable[[tuple[p.ExecuteTask, Any]], None] | None = None
        self.direct_socket_path: str | None = None  # an actor's, once it is alive
        self._begun: BegunCalls | None = None  # an actor's calls begun, not answered
        # ray.cancel of actor calls (CancelCall, from the reader thread): those running,
        # those cancelled before they began, and an async actor's asyncio tasks
        self._calls_lock = threading.Lock()
        self._running: dict[str, context.TaskContext] = {}
        self._cancel_before_start: set[str] = set()
        self._async_calls: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = {}
        # the queues calls wait in: the worker's, and its concurrency groups' if any
        self._queues: list[queue.Queue[Any]] = [client.tasks]
        self._marks = OutputMarks()  # whose lines this process prints next
        client.on_cancel_call = self.cancel_call
        # streaming generators with backpressure: how many values their callers took,
        # and how an async one waiting for that is woken
        self._consumed: dict[str, int] = {}
        self._consumed_changed = threading.Condition()
        self._consumed_wakers: dict[str, Callable[[], None]] = {}
        client.on_stream_consumed = self.stream_consumed

    def run(self) -> None:
        while (item := self.client.tasks.get()) is not None:
            if self._concurrently is not None:
                self._concurrently(item)
                continue
            message, caller = item
            if message.spec.method != "__init__":
                self._run_call(message, caller)
                continue
            done = self.execute(message)
            started = done.error is None
            if started:  # listening before the daemon hears that the actor is alive
                self._open_direct_route(message.spec)
            self._reply(done, caller)
            if started:
                self._start_concurrency(message.spec)
        for calls in self._queues:  # for the other threads taking calls, if any
            calls.put(None)

    def _take_calls(self, calls: queue.Queue[Any] | None = None) -> None:
        """A thread of a threaded actor: runs calls as they come, like run(), from the
        worker's queue or its concurrency group's."""
        calls = calls if calls is not None else self.client.tasks
        while (item := calls.get()) is not None:
            self._run_call(*item)
        calls.put(None)

    def _run_call(self, message: p.ExecuteTask, caller: p.SyncChannel | None) -> None:
        """Runs a task, or an actor's call marked begun until it is answered."""
        with self._marked_begun(message):
            self._reply(self.execute(message), caller)

    def _marked_begun(self, message: p.ExecuteTask) -> contextlib.AbstractContextManager[None]:
        if self._begun is None:  # a task, or an actor's constructor
            return contextlib.nullcontext()
        return self._begun.running(message.spec.task_id)

    def _reply(self, done: p.TaskDone, caller: p.SyncChannel | None) -> None:
        """Tells the daemon first, then a direct caller: so a result the caller has seen
        is always one the daemon records, even if this process dies in between. An
        exit_actor() is answered by the daemon alone (as the actor's death)."""
        exiting = done.error is not None and done.error.kind == "actor_exit"
        done.direct = caller is not None
        data = p.encode(done)
        self.client.send_encoded(data)
        if caller is not None and not exiting:
            with contextlib.suppress(OSError):  # the caller is gone: the daemon has it
                caller.send_encoded(data)
        if exiting:
            self.client.tasks.put(None)  # ends run(): the actor is over

    # -- direct calls ------------------------------------------------------------------

    def _open_direct_route(self, creation: p.TaskSpec) -> None:
        """Listens for calls sent straight from callers on this node (SubmitDirectCall):
        they join the same queue as the daemon's, so the actor runs them alike. Calls
        are marked begun from now on (dataplane/begun_calls.py)."""
        session_dir, worker_id = self.client.welcome.session_dir, self.client.worker_id
        assert worker_id is not None
        options = creation.actor_options
        limit = p.calls_at_once(options) if options else 1  # (every group's at once)
        self._begun = BegunCalls(begun_calls_path(session_dir, worker_id), limit)
        path = p.direct_socket_path(session_dir, worker_id)
        server = p.bind_private_socket(path)
        server.listen(64)
        self.direct_socket_path = path
        threading.Thread(target=self._accept_direct, args=(server,), daemon=True).start()

    def _accept_direct(self, server: socket.socket) -> None:
        while True:
            try:
                sock, _ = server.accept()
            except OSError:
                return
            channel = p.SyncChannel(sock=sock)
            threading.Thread(target=self._read_direct, args=(channel,), daemon=True).start()

    def _read_direct(self, channel: p.SyncChannel) -> None:
        try:
            while True:
                message = channel.receive()
                if not isinstance(message, p.SubmitDirectCall):
                    raise p.ProtocolError(f"unexpected message {type(message).__name__}")
                spec = message.spec
                args = message.args or [None] * len(spec.args)
                call = p.ExecuteTask(spec, 0, None, args, message.kwargs)
                self.client.tasks.put((call, channel))
        except (EOFError, OSError):
            pass
        except p.ProtocolError as exc:  # this caller's calls go through the daemon now
            print(f"cairn worker: closing a direct caller: {exc}", file=sys.stderr)
        channel.close()

    def cancel_call(self, task_id: str) -> None:
        """ray.cancel of an actor's call (Ray's way): one still queued here is answered
        as cancelled at once and never runs (one not here yet, when it comes); an
        async actor's is cancelled as a coroutine (asyncio.CancelledError in it, or
        while it waits for a slot); a running sync call is only marked, for
        ``is_canceled()`` to tell."""
        queued = None
        with self._calls_lock:
            running = self._running.get(task_id)
            if running is not None:
                running.cancelled = True
            found = self._async_calls.get(task_id)
            if running is None and found is None:
                queued = self._take_queued(task_id)
                if queued is None:
                    self._cancel_before_start.add(task_id)
                    return
        if found is not None:
            loop, task = found
            loop.call_soon_threadsafe(task.cancel)
        elif queued is not None:
            message, caller = queued
            self._reply(self._failure(message, KeyboardInterrupt()), caller)

    def stream_consumed(self, task_id: str, count: int) -> None:
        """The caller of a streaming generator took ``count`` of its values (from the
        reader thread): a generator paused for it may go on."""
        with self._consumed_changed:
            self._consumed[task_id] = max(count, self._consumed.get(task_id, 0))
            self._consumed_changed.notify_all()
            wake = self._consumed_wakers.get(task_id)
        if wake is not None:
            wake()

    def consumed(self, task_id: str) -> int:
        with self._consumed_changed:
            return self._consumed.get(task_id, 0)

    def wait_consumed(self, task_id: str, count: int) -> None:
        """Until the caller took ``count`` values (a timed wait, so that SIGINT --
        ray.cancel -- is not held off)."""
        with self._consumed_changed:
            while self._consumed.get(task_id, 0) < count:
                self._consumed_changed.wait(0.5)

    async def wait_consumed_async(self, task_id: str, count: int) -> None:
        """``wait_consumed`` on an async actor's loop, which goes on meanwhile."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        with self._consumed_changed:

            def wake() -> None:
                loop.call_soon_threadsafe(woken.set)

            self._consumed_wakers[task_id] = wake
        try:
            while self.consumed(task_id) < count:
                await woken.wait()
                woken.clear()
        finally:
            with self._consumed_changed:
                self._consumed_wakers.pop(task_id, None)

    def forget_consumed(self, task_id: str) -> None:
        with self._consumed_changed:
            self._consumed.pop(task_id, None)

    def _take_queued(self, task_id: str) -> tuple[p.ExecuteTask, p.SyncChannel | None] | None:
        """Takes the call out of this worker's queues, if it waits there."""
        for calls in self._queues:
            with calls.mutex:
                for item in calls.queue:
                    if item is not None and item[0].spec.task_id == task_id:
                        calls.queue.remove(item)
                        return item  # type: ignore[no-any-return]
        return None

    def _begin(
        self, message: p.ExecuteTask, *, in_async: bool = False
    ) -> context.TaskContext | None:
        """The call's context, now running; None if it was cancelled before it began.
        Only an actor's calls are registered (``cancel_call``): a task is cancelled by
        SIGINT."""
        task = self._context(message)
        task.in_async_actor = in_async
        spec = message.spec
        if spec.actor_id is None or spec.method == "__init__":
            return task
        task_id = spec.task_id
        with self._calls_lock:
            if task_id in self._cancel_before_start:
                self._cancel_before_start.discard(task_id)
                return None
            self._running[task_id] = task
        return task

    def _end(self, message: p.ExecuteTask) -> None:
        if message.spec.actor_id is not None:
            with self._calls_lock:
                self._running.pop(message.spec.task_id, None)

    def execute(self, message: p.ExecuteTask) -> p.TaskDone:
        spec = message.spec
        task = self._begin(message)
        if task is None:
            return self._failure(message, KeyboardInterrupt())
        context.set_task(task)
        restore = self._use_gpus(message)
        restore_env = _use_env_vars(task, for_good=spec.method == "__init__")
        try:
            try:
                function, args, kwargs = self._prepare(message)
                task.function = function
                result = function(*args, **kwargs)
                if spec.method == "__init__":
                    self.actor, result = result, None
                if _yields_returns(spec, result):
                    return self._generate(message, result)
            except BaseException as exc:
                return self._failure(message, exc)
            if task.cancelled and spec.actor_id is not None:  # (as Ray: a sync call that
                # ran on after ray.cancel() reached it ends cancelled, whatever it returned)
                return self._failure(message, KeyboardInterrupt())
            return self._finish(message, result)
        finally:
            context.set_task(None)
            restore()
            restore_env()
            self._end(message)

    def _context(self, message: p.ExecuteTask) -> context.TaskContext:
        spec = message.spec
        gpu_ids = self.actor_gpu_ids if spec.actor_id is not None else tuple(message.gpu_ids)
        if spec.method == "__init__":
            gpu_ids = self.actor_gpu_ids = tuple(message.gpu_ids)
            self.actor_creation = message
        creation = self.actor_creation if spec.actor_id is not None else None
        made = creation.spec if creation is not None else spec
        strategy = made.strategy
        captured = None
        if strategy is not None and strategy[0] == "PLACEMENT_GROUP" and strategy[3]:
            captured = ("PLACEMENT_GROUP", strategy[1], "-1", "capture")
        return context.TaskContext(
            spec.task_id,
            spec.job_id,
            message.attempt,
            gpu_ids,
            captured,
            name=spec.name,
            resources=made.resources,
            actor_id=spec.actor_id,
            actor_options=made.actor_options,
            actor_restarted=creation is not None and creation.restarts > 0,
            placement_group_id=(
                strategy[1] if strategy is not None and strategy[0] == "PLACEMENT_GROUP" else None
            ),
            runtime_env=getattr(made, "runtime_env", None),
            namespace=getattr(made, "namespace", None),
        )

    def _use_gpus(self, message: p.ExecuteTask) -> Callable[[], None]:
        """Shows the task only its GPUs (``CUDA_VISIBLE_DEVICES``), as Ray does; an
        actor's stay set for its life. Returns what undoes it after a task."""
        if not message.gpu_ids:
            return lambda: None
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(message.gpu_ids)
        if message.spec.actor_id is not None:
            return lambda: None

        def restore() -> None:
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before

        return restore

    async def execute_async(self, message: p.ExecuteTask) -> p.TaskDone:
        """A call of an async actor: coroutine methods are awaited on the actor's loop."""
        task = self._begin(message, in_async=True)
        if task is None:
            return self._failure(message, asyncio.CancelledError())
        context.set_task(task)
        try:
            if _fetches_arguments(message):  # (a thread waits for them, not the loop:
                # the actor's other calls go on meanwhile, as in Ray)
                prepared = await asyncio.to_thread(self._prepare, message)
            else:
                prepared = self._prepare(message)
            function, args, kwargs = prepared
            task.function = function
            result = function(*args, **kwargs)
            if _yields_returns(message.spec, result):
                return await self._generate_async(message, result)
            if inspect.iscoroutine(result):  # (an async method's; a returned ref is a value)
                result = await result
        except BaseException as exc:
            return self._failure(message, exc)
        finally:
            self._end(message)
        return self._finish(message, result)

    def _start_concurrency(self, spec: p.TaskSpec) -> None:
        """How the actor runs calls at once: an async actor's on its event loop, up to
        each concurrency group's limit; a threaded one's in ``max_concurrency``
        threads, or with concurrency groups in threads of each group (the default
        group's ``max_concurrency``), each group taking its own calls."""
        options = spec.actor_options
        limit = options.max_concurrency if options else 1
        sizes = {
            "": limit,
            **((getattr(options, "concurrency_groups", None) or {}) if options else {}),
        }
        method_groups = (getattr(options, "method_groups", None) or {}) if options else {}

        def group_of(message: p.ExecuteTask) -> str:  # the call's own, else its method's
            own = getattr(message.spec, "concurrency_group", None)
            return own or method_groups.get(message.spec.method or "", "")

        is_async = any(  # (async generator methods too, as in Ray)
            inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member)
            for _, member in inspect.getmembers(type(self.actor), inspect.isfunction)
        )
        if is_async:
            # as Ray: each concurrency group has an event loop (and thread) of its own,
            # so a call that blocks one group's loop holds no other group's calls; the
            # default group's is the loop the constructor saw (asyncio.get_event_loop())
            loops = {
                name: _constructor_loop() if not name else asyncio.new_event_loop()
                for name in sizes
            }
            for name, loop in loops.items():
                thread = f"cairn-actor-loop-{name or 'default'}"
                threading.Thread(target=loop.run_forever, name=thread, daemon=True).start()
            groups = {name: asyncio.Semaphore(size) for name, size in sizes.items()}

            async def bounded(item: tuple[p.ExecuteTask, p.SyncChannel | None]) -> None:
                message, caller = item
                task_id = message.spec.task_id
                current = asyncio.current_task()
                assert current is not None
                with self._calls_lock:  # cancel_call cancels it, waiting or running
                    self._async_calls[task_id] = (asyncio.get_running_loop(), current)
                try:
                    async with groups[group_of(message)]:
                        with self._marked_begun(message):
                            done = await self.execute_async(message)
                except asyncio.CancelledError as cancelled:  # while it waited for a slot
                    done = self._failure(message, cancelled)
                finally:
                    with self._calls_lock:
                        self._async_calls.pop(task_id, None)
                self._reply(done, caller)

            self._concurrently = lambda m: asyncio.run_coroutine_threadsafe(
                bounded(m), loops[group_of(m[0])]
            ).add_done_callback(_raise_unexpected)
        elif len(sizes) > 1:  # concurrency groups: run() hands each call to its group
            queues = {name: queue.Queue[Any]() for name in sizes}
            self._queues.extend(queues.values())
            for name, size in sizes.items():
                for n in range(size):
                    thread = f"cairn-actor-{name or 'default'}-{n + 1}"
                    threading.Thread(
                        target=self._take_calls, args=(queues[name],), name=thread, daemon=True
                    ).start()
            self._concurrently = lambda item: queues[group_of(item[0])].put(item)
        else:  # threaded: this thread and limit - 1 others take calls from the queue
            for n in range(limit - 1):
                name = f"cairn-actor-{n + 1}"
                threading.Thread(target=self._take_calls, name=name, daemon=True).start()

    def _prepare(self, message: p.ExecuteTask) -> tuple[Callable[..., Any], list, dict]:
        spec = message.spec
        function = self._callable(spec, message.function_blob)
        self._marks.mark(spec.job_id, self._shown_name(spec, function))
        args = [self._value(a, loc) for a, loc in zip(spec.args, message.args, strict=True)]
        kwargs = {k: self._value(a, message.kwargs.get(k)) for k, a in spec.kwargs.items()}
        return function, args, kwargs

    def _shown_name(self, spec: p.TaskSpec, function: Any) -> str:
        """What the driver's prefix of this task's output names, as Ray's: the actor's
        class (its repr if it has its own), else the task's name without the module."""
        if spec.actor_id is not None and self.actor_creation is not None:
            if self.actor is not None and type(self.actor).__repr__ is not object.__repr__:
                with contextlib.suppress(Exception):
                    return repr(self.actor)
            return self.actor_creation.spec.name.removesuffix(".__init__").rsplit(".", 1)[-1]
        qualname = getattr(function, "__qualname__", None)
        if qualname and spec.name == f"{getattr(function, '__module__', '')}.{qualname}":
            return qualname
        return spec.name

    def _failure(self, message: p.ExecuteTask, exc: BaseException) -> p.TaskDone:
        spec = message.spec
        if isinstance(exc, SystemExit):
            _exit_worker(exc)
        if isinstance(exc, _ArgumentFailed):  # the call fails with its argument's error
            error = exc.error
        elif isinstance(exc, context.ActorExit):
            error = p.ErrorInfo("actor_exit", "exit_actor() was called", spec.name)
        elif isinstance(exc, ObjectMissingError):  # an argument's bytes are gone
            error = p.ErrorInfo("object_lost", str(exc))
        elif isinstance(exc, KeyboardInterrupt | asyncio.CancelledError):
            error = p.ErrorInfo.cancelled(spec.name)
        else:  # the user's exception, reported to the caller
            error = _task_error(spec.name, exc)
            if spec.retry_exception_types is not None:
                error.retryable = isinstance(exc, cloudpickle.loads(spec.retry_exception_types))
        return self._failed(spec, message, error)

    # -- generators: their values stored as they are yielded (``_Yields``) -------------

    def _generate(self, message: p.ExecuteTask, values: Any) -> p.TaskDone:
        """Runs a generator task to its end, each value stored as it is yielded; an
        exception raised at a yield is its error there (``_Yields.failed``)."""
        values = _iterate(values, message.spec)  # (not a generator: the task's error)
        yields = _Yields(self, message)
        try:
            for value in values:
                if not yields.add(value):
                    break
                if (until := yields.pause_until()) is not None:
                    self.wait_consumed(message.spec.task_id, until)
        except BaseException as exc:
            return yields.failed(exc)
        finally:
            self.forget_consumed(message.spec.task_id)
        return yields.done()

    async def _generate_async(self, message: p.ExecuteTask, values: Any) -> p.TaskDone:
        """``_generate`` of an async actor's generator (an async one is iterated here,
        on the actor's loop; a sync one too)."""
        if not inspect.isasyncgen(values):
            return self._generate(message, values)
        yields = _Yields(self, message)
        try:
            async for value in values:
                if not yields.add(value):
                    break
                if (until := yields.pause_until()) is not None:
                    await self.wait_consumed_async(message.spec.task_id, until)
        except BaseException as exc:
            return yields.failed(exc)
        finally:
            self.forget_consumed(message.spec.task_id)
        return yields.done()

    def _finish(self, message: p.ExecuteTask, result: Any) -> p.TaskDone:
        spec = message.spec
        digest = xxhash.xxh3_128()  # over the returns' checksums, in order
        try:
            values = _split_returns(result, spec.num_returns)
            returns = [
                self._store(object_id, value, digest)
                for object_id, value in zip(spec.return_ids(), values, strict=True)
            ]
        except (SerializationError, ValueError, OSError, DaemonError) as exc:
            # the value cannot be stored (unpicklable, store full, /dev/shm failing):
            # the task's error, and this worker stays up for the next one
            return self._failed(spec, message, _task_error(spec.name, _as_ray_error(exc)))
        return p.TaskDone(
            spec.task_id, message.attempt, returns, None, f"xxh3:{digest.hexdigest()}"
        )

    def _callable(self, spec: p.TaskSpec, blob: bytes | None) -> Callable[..., Any]:
        """The task's function; for an actor's constructor, its class; for a method
        call, the bound method of this worker's actor."""
        if spec.actor_id is not None and spec.method != "__init__":
            return self._method(spec.method or "")
        if blob is not None:
            self.functions[spec.function_id] = cloudpickle.loads(blob)
        return self.functions[spec.function_id]

    def _method(self, name: str) -> Callable[..., Any]:
        """The actor's method, from its class as Ray's (an instance attribute of the same
        name does not hide it); ``__ray_ready__``, which every actor has."""
        if name == p.READY_METHOD:
            return _ready
        found = self._methods.get(name)
        if found is None:
            cls = type(self.actor)
            try:
                found = self._methods[name] = inspect.getattr_static(cls, name)
            except AttributeError:
                return getattr(self.actor, name)  # (made by __getattr__, say)
        binder = getattr(found, "__get__", None)
        return binder(self.actor, type(self.actor)) if binder is not None else found

    def _value(self, arg: p.Arg, location: p.ObjectLocation | None) -> Any:
        if arg.inline is not None:
            return deserialize(arg.inline)
        if location is None:  # a direct call's ref argument: asked for here, in order
            assert arg.ref is not None
            (location,) = self.client.get_locations([arg.ref], None)
            if location.error is not None:  # (a direct call's: the daemon checks its own)
                raise _ArgumentFailed(location.error)
            return self.client.read_value(location)
        if location.error is not None:
            raise _ArgumentFailed(location.error)
        return self.client.read_value(location, task_argument=True)

    def _store(self, object_id: str, value: Any, digest: Any) -> p.ObjectLocation:
        """Stores one return value and feeds ``digest`` its checksum: the one computed
        while it was written (no second pass), or for a large or unchecked blob the same
        checksum computed from the value, so equal values give equal digests."""
        try:
            serialized, contained = serialize_with_refs(value)
        except SerializationError as exc:
            raise SerializationError(f"return value: {exc}") from exc
        location = self.client.store(object_id, serialized, contained)
        digest.update(serialized.value_checksum().to_bytes(8, "little"))
        return location

    @staticmethod
    def _failed(spec: p.TaskSpec, message: p.ExecuteTask, error: p.ErrorInfo) -> p.TaskDone:
        return p.TaskDone(spec.task_id, message.attempt, [], error=error)


class _Yields:
    """One run of a generator task, its values stored as they are yielded (digested in
    order) and then, by its num_returns:

    - ``"streaming"``: each sent at once (StreamItem), for the node to make visible
      (controlplane/node/streams.py); an error, as the next value;
    - ``"dynamic"``: kept until the generator is over, then its one return (index 0) is
      a DynamicObjectRefGenerator over them, the i-th value being return i + 1 (then
      the error it raised, if it did, as Ray stores it);
    - an int: exactly that many returns; one that raised (or yielded too few) keeps
      the values it made, and the others are its error (``p.outcome``)."""

    def __init__(self, worker: Worker, message: p.ExecuteTask) -> None:
        self.worker, self.message = worker, message
        spec = message.spec
        self.first = 1 if spec.dynamic else 0  # the index of the first value's id
        self.made: list[p.ObjectLocation] = []
        self.sent = 0  # a streaming generator's values sent so far
        self.digest = xxhash.xxh3_128()

    def _next_id(self) -> str:
        index = self.first + self.sent + len(self.made)
        return p.return_object_id(self.message.spec.task_id, index)

    def add(self, value: Any) -> bool:
        """Stores one value; False when the generator yielded one more than its int
        num_returns: as in Ray, the error is logged (to the worker's stderr, which the
        driver prints) and the task keeps the values it declared (Ray's known bug, which
        its own tests assert: ray-project/ray#28689)."""
        spec = self.message.spec
        if spec.num_returns >= 0 and len(self.made) == spec.num_returns:
            print(f"ERROR: {_WrongCount(spec, len(self.made) + 1)}", file=sys.stderr, flush=True)
            return False
        try:
            location = self.worker._store(self._next_id(), value, self.digest)
        except (SerializationError, ValueError, OSError, DaemonError) as exc:
            raise _YieldNotStored(exc) from exc
        if spec.streaming:
            self._send(location)
        else:
            self.made.append(location)
        return True

    def pause_until(self) -> int | None:
        """With backpressure, how many values the caller must have taken before the
        generator goes on (None: it goes on now)."""
        limit = getattr(self.message.spec, "generator_backpressure", -1)
        if limit <= 0 or self.sent - self.worker.consumed(self.message.spec.task_id) < limit:
            return None
        return self.sent - limit + 1

    def failed(self, exc: BaseException) -> p.TaskDone:
        spec = self.message.spec
        if isinstance(exc, _YieldNotStored | _WrongCount):  # an error of the task itself
            cause = _as_ray_error(exc.cause) if isinstance(exc, _YieldNotStored) else exc
            done = self.worker._failed(spec, self.message, _task_error(spec.name, cause))
        else:
            done = self.worker._failure(self.message, exc)
        assert done.error is not None
        error = done.error
        # an exception retry_exceptions names: the daemon runs the generator again (out
        # of retries, a stream's caller gets the error as its next value from it)
        may_retry = spec.retry_exceptions and error.retryable and error.kind == "task_error"
        if spec.streaming and not may_retry:
            self._send(p.ObjectLocation(self._next_id(), error=error))
        elif spec.streaming:
            pass
        elif spec.dynamic and may_retry:
            self._give_back()
        elif spec.dynamic and error.kind == "task_error":  # its last value, and it is over
            self.made.append(p.ObjectLocation(self._next_id(), error=error))
            return self.done()
        elif error.kind != "task_error":
            self._give_back()  # (cancelled: none of its values is kept)
        else:
            done.returns = self.made
        return done

    def done(self) -> p.TaskDone:
        spec = self.message.spec
        if spec.num_returns > len(self.made):
            return self.failed(_WrongCount(spec, len(self.made)))
        returns = self.made
        if spec.dynamic:
            ids = [location.object_id for location in self.made]
            value = Serialized(_dynamic_generator_pickle(ids), [])
            outer = p.return_object_id(spec.task_id, 0)
            returns = [self.worker.client.store(outer, value, tuple(ids)), *self.made]
        return p.TaskDone(
            spec.task_id, self.message.attempt, returns, None, f"xxh3:{self.digest.hexdigest()}"
        )

    def _send(self, location: p.ObjectLocation) -> None:
        spec = self.message.spec
        self.worker.client.send(
            p.StreamItem(spec.task_id, self.message.attempt, self.sent, location)
        )
        self.sent += 1

    def _give_back(self) -> None:
        """The values made are nobody's: their room in the store goes back."""
        for location in self.made:
            if location.region is not None:
                self.worker.client.send(p.ReleaseShm(location.region, location.offset))
        self.made = []


class _WrongCount(ValueError):
    """A generator with an int num_returns yielded another number of values: too few
    (those it yielded are kept, as in Ray; the others are this error) or too many
    (only logged, ``_Yields.add``)."""

    def __init__(self, spec: p.TaskSpec, got: int) -> None:
        count = f"more than {spec.num_returns}" if got > spec.num_returns else str(got)
        super().__init__(
            f"{spec.name} declared num_returns={spec.num_returns} but its generator yielded "
            f"{count} values"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # (rebuilt at the caller as Ray's ValueError)
        return (ValueError, self.args)


class _YieldNotStored(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _yields_returns(spec: p.TaskSpec, result: Any) -> bool:
    """Whether the task's values are a generator's, stored as they are yielded: a
    streaming or dynamic one, or a generator with an int num_returns (as in Ray)."""
    if spec.num_returns < 0:
        return True
    return spec.num_returns > 0 and (inspect.isgenerator(result) or inspect.isasyncgen(result))


def _iterate(values: Any, spec: p.TaskSpec) -> Any:
    """The values of a generator task's result: a generator (or iterator), as Ray asks;
    TypeError for anything else, a list included."""
    if not isinstance(values, collections.abc.Iterator):
        kind = "streaming" if spec.streaming else "dynamic"
        raise TypeError(
            f"{spec.name} has num_returns={kind!r} but returned a {type(values).__name__}, "
            "not a generator"
        )
    return iter(values)


def _dynamic_generator_pickle(object_ids: list[str]) -> bytes:
    """The pickle of ``sdk.generator._dynamic_generator(object_ids)``: a dynamic
    generator's value, a DynamicObjectRefGenerator over its values' refs. Written by
    hand because the data plane does not import the SDK; whoever reads it does (as
    for any ref in a value): protocol 5 opcodes, no memo, each string under 256 bytes."""

    def text(value: str) -> bytes:
        data = value.encode()
        return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE

    body = b"".join(text(object_id) for object_id in object_ids)
    # PROTO 5, module, name, STACK_GLOBAL, EMPTY_LIST, MARK, ids, APPENDS, TUPLE1, REDUCE, STOP
    return (
        b"\x80\x05"
        + text("sdk.generator")
        + text("_dynamic_generator")
        + b"\x93]("
        + body
        + b"e\x85R."
    )


class _ArgumentFailed(Exception):
    """A direct call's argument stands for an error (its task failed)."""

    def __init__(self, error: p.ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def _raise_unexpected(future: Any) -> None:
    """Surfaces a bug in running a call concurrently (the call's own errors are replies)."""
    if not future.cancelled() and future.exception() is not None:
        traceback.print_exception(future.exception())


def _split_returns(result: Any, num_returns: int) -> list[Any]:
    if num_returns == 1:
        return [result]
    if num_returns == 0:
        return []
    # a list or tuple (a generator's values were stored as it yielded them: _Yields)
    values = list(result) if isinstance(result, list | tuple) else None
    if values is None or len(values) != num_returns:
        got = f"{len(values)} values" if values is not None else type(result).__name__
        raise ValueError(f"the task declared num_returns={num_returns} but returned {got}")
    return values


def _as_ray_error(exc: BaseException) -> BaseException:
    """A full store refusing a return value is Ray's ObjectStoreFullError, so that the
    caller's ``except ObjectStoreFullError`` catches it (as the RayTaskError's cause)."""
    if isinstance(exc, DaemonError) and exc.kind == "store_full":
        return ObjectStoreFullError(str(exc))
    return exc


def _ready() -> bool:
    return True


def _constructor_loop() -> asyncio.AbstractEventLoop:
    """The event loop of this (the main) thread, which an async actor's constructor
    gets from ``asyncio.get_event_loop()``; made now if it asked for none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            return loop


def _exit_worker(exc: SystemExit) -> NoReturn:
    """As Ray: ``sys.exit()`` in a task or actor method ends its worker process, which
    the daemon sees die (a task is retried as after a crash; an actor restarts, and the
    call is retried, as ``max_restarts`` and ``max_task_retries`` allow)."""
    code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _fetches_arguments(message: p.ExecuteTask) -> bool:
    """Whether the call has ref arguments whose place it must still ask for (a direct
    call's, whose caller did not know it): asking may wait until they are made."""
    spec = message.spec
    if not spec.dependencies():
        return False
    pairs = [*zip(spec.args, message.args, strict=True)]
    pairs += [(a, message.kwargs.get(k)) for k, a in spec.kwargs.items()]
    return any(arg.ref is not None and location is None for arg, location in pairs)


def _task_error(function_name: str, exc: BaseException) -> p.ErrorInfo:
    text = "".join(traceback.format_exception(exc))
    try:
        cause = cloudpickle.dumps(exc)
    except Exception:
        cause = None  # the SDK raises a RayTaskError that carries the traceback text
    return p.ErrorInfo("task_error", f"{type(exc).__name__}: {exc}", function_name, text, cause)


def _use_env_vars(task: context.TaskContext, *, for_good: bool) -> Callable[[], None]:
    """Sets the task's runtime_env env_vars in this process; what undoes it after the
    task (nothing ``for_good``: an actor's constructor, whose worker is the actor's; an
    actor's calls already have them)."""
    wanted = (task.runtime_env or {}).get("env_vars") or {}
    if not wanted or (task.actor_id is not None and not for_good):
        return lambda: None
    before = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    if for_good:
        return lambda: None

    def restore() -> None:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    return restore


def _interrupted(_signum: int, _frame: Any) -> None:
    """SIGINT, the daemon's ray.cancel of the task running in this thread: it gets
    KeyboardInterrupt, and ``is_canceled()`` is True from now on (as in Ray). One
    that comes after the task ended is ignored: it was meant for that task."""
    task = context.current_task()
    if task is None:
        return
    task.cancelled = True
    raise KeyboardInterrupt


def _die_with(parent_pid: int) -> None:
    """Dies with the node daemon (set here rather than in a preexec_fn: forking a
    process with gRPC's threads and running Python before exec can deadlock)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # it died before we asked
        os._exit(1)


def main() -> None:
    socket_path, worker_id = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        _die_with(int(sys.argv[3]))
    signal.signal(signal.SIGINT, _interrupted)
    for stream in (sys.stdout, sys.stderr):  # files: each line reaches them as printed
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if not os.isatty(1):
        rotate_when_full()
    client = CoreClient(socket_path, "worker", worker_id)
    context.set_client(client)
    worker = Worker(client)
    try:
        worker.run()
    finally:
        client.close()
        if worker.direct_socket_path is not None:  # an actor ending on its own
            with contextlib.suppress(OSError):
                os.unlink(worker.direct_socket_path)
            with contextlib.suppress(OSError):
                os.unlink(begun_calls_path(client.welcome.session_dir, worker_id))
        os._exit(0)


if __name__ == "__main__":
    main()
