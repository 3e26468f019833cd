"""A worker process: connects to its node daemon, then executes the tasks it is sent,
one at a time, reading arguments from the store and writing results into it.

Run as ``python -m dataplane.worker SOCKET WORKER_ID``; the daemon starts and replaces
workers. A task cancelled without force gets KeyboardInterrupt (the daemon sends
SIGINT), which is reported as cancellation.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from dataplane import context
from dataplane import protocol as p
from dataplane.client import CoreClient, ObjectMissingError
from dataplane.serialization import SerializationError, deserialize, serialize_with_refs


class Worker:
    def __init__(self, client: CoreClient) -> None:
        self.client = client
        self.functions: dict[str, Callable[..., Any]] = {}
        self.actor: Any = None  # the instance, in a worker dedicated to an actor

    def run(self) -> None:
        while (message := self.client.tasks.get()) is not None:
            done = self.execute(message)
            self.client.send(done)
            if done.error is not None and done.error.kind == "actor_exit":
                return

    def execute(self, message: p.ExecuteTask) -> p.TaskDone:
        spec = message.spec
        context.set_task(context.TaskContext(spec.task_id, spec.job_id, message.attempt))
        try:
            try:
                function = self._callable(spec, message.function_blob)
                args = [self._value(a, loc) for a, loc in zip(spec.args, message.args, strict=True)]
                kwargs = {k: self._value(a, message.kwargs.get(k)) for k, a in spec.kwargs.items()}
                result = function(*args, **kwargs)
                if spec.method == "__init__":
                    self.actor, result = result, None
            except context.ActorExit:
                return self._failed(
                    spec, message, p.ErrorInfo("actor_exit", "exit_actor() was called", spec.name)
                )
            except ObjectMissingError as missing:  # an argument's bytes are gone
                return self._failed(spec, message, p.ErrorInfo("object_lost", str(missing)))
            except KeyboardInterrupt:
                return self._failed(
                    spec,
                    message,
                    p.ErrorInfo("cancelled", f"task {spec.name} was cancelled", spec.name),
                )
            except BaseException as exc:  # the user's exception, reported to the caller
                error = _task_error(spec.name, exc)
                if spec.retry_exception_types is not None:
                    error.retryable = isinstance(exc, cloudpickle.loads(spec.retry_exception_types))
                return self._failed(spec, message, error)
            try:
                values = _split_returns(result, spec.num_returns)
                returns = [
                    self._store(object_id, value)
                    for object_id, value in zip(spec.return_ids(), values, strict=True)
                ]
            except (SerializationError, ValueError) as exc:
                return self._failed(spec, message, _task_error(spec.name, exc))
            return p.TaskDone(spec.task_id, message.attempt, returns)
        finally:
            context.set_task(None)

    def _callable(self, spec: p.TaskSpec, blob: bytes | None) -> Callable[..., Any]:
        """The task's function; for an actor's constructor, its class; for a method
        call, the bound method of this worker's actor."""
        if spec.actor_id is not None and spec.method != "__init__":
            return getattr(self.actor, spec.method or "")
        if blob is not None:
            self.functions[spec.function_id] = cloudpickle.loads(blob)
        return self.functions[spec.function_id]

    def _value(self, arg: p.Arg, location: p.ObjectLocation | None) -> Any:
        if arg.inline is not None:
            return deserialize(arg.inline)
        assert location is not None, "the daemon sends the location of every ref argument"
        return self.client.read_value(location)

    def _store(self, object_id: str, value: Any) -> p.ObjectLocation:
        try:
            serialized, contained = serialize_with_refs(value)
        except SerializationError as exc:
            raise SerializationError(f"return value: {exc}") from exc
        return self.client.store(object_id, serialized, contained)

    @staticmethod
    def _failed(spec: p.TaskSpec, message: p.ExecuteTask, error: p.ErrorInfo) -> p.TaskDone:
        return p.TaskDone(spec.task_id, message.attempt, [], error=error)


def _split_returns(result: Any, num_returns: int) -> list[Any]:
    if num_returns == 1:
        return [result]
    if num_returns == 0:
        return []
    values = list(result) if isinstance(result, list | tuple) else None
    if values is None or len(values) != num_returns:
        got = f"{len(values)} values" if values is not None else type(result).__name__
        raise ValueError(f"the task declared num_returns={num_returns} but returned {got}")
    return values


def _task_error(function_name: str, exc: BaseException) -> p.ErrorInfo:
    text = "".join(traceback.format_exception(exc))
    try:
        cause = cloudpickle.dumps(exc)
    except Exception:
        cause = None  # the SDK raises a RayTaskError that carries the traceback text
    return p.ErrorInfo("task_error", f"{type(exc).__name__}: {exc}", function_name, text, cause)


def main() -> None:
    socket_path, worker_id = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    client = CoreClient(socket_path, "worker", worker_id)
    context.set_client(client)
    try:
        Worker(client).run()
    finally:
        client.close()
        os._exit(0)


if __name__ == "__main__":
    main()
