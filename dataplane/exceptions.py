"""Exceptions with Ray's names and meanings (``ray.exceptions``).

Users import them from ``sdk.exceptions``; they live here, below the SDK, because a
worker raises some of them too (ObjectStoreFullError for a return value the store
cannot hold), and the dataplane never imports the SDK.
"""

from __future__ import annotations

import pickle
from typing import Any


class RayError(Exception):
    """Base class of every error Cairn raises to a program (as ``ray.exceptions.RayError``)."""


class RaySystemError(RayError):
    """The runtime itself failed (for example the GCS could not record a result)."""


class RayTaskError(RayError):
    """A task raised. The message carries the remote traceback; ``cause`` is the
    original exception. Raised from ``get`` as an instance of both RayTaskError and the
    original exception's class, so ``except ValueError`` catches a remote ValueError."""

    def __init__(
        self,
        function_name: str,
        traceback_str: str,
        cause: BaseException | None,
        proctitle: str = "",
        pid: int = 0,
        ip: str = "",
    ) -> None:
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        self.proctitle = proctitle
        self.pid = pid
        self.ip = ip
        super().__init__(self._message())

    def _message(self) -> str:
        return f"{self.function_name}() failed:\n{self.traceback_str.rstrip()}"

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self) -> tuple[Any, ...]:
        return (RayTaskError, (self.function_name, self.traceback_str, self.cause))

    def as_instanceof_cause(self) -> RayTaskError:
        """This error as an instance of RayTaskError *and* the cause's class."""
        cause_cls = type(self.cause) if self.cause is not None else None
        if cause_cls is None or issubclass(cause_cls, RayTaskError):
            return self
        try:
            derived = type(
                f"RayTaskError({cause_cls.__name__})",
                (RayTaskError, cause_cls),
                {
                    "__init__": lambda s, *a, **k: None,
                    "__str__": RayTaskError.__str__,
                    "__reduce__": RayTaskError.__reduce__,
                },
            )
            error = derived()
        except TypeError:  # a cause class that cannot be a base (final, or layout clash)
            return self
        error.__dict__.update(self.__dict__)
        error.args = (self._message(),)
        return error


class GetTimeoutError(RayError, TimeoutError):
    """``get`` did not finish within its timeout."""


class TaskCancelledError(RayError):
    """The task was cancelled (``cancel``) before it finished."""

    def __init__(self, task_id: str | None = None, message: str | None = None) -> None:
        self.task_id = task_id
        super().__init__(message or f"task {task_id} was cancelled")


class WorkerCrashedError(RayError):
    """The worker running the task died unexpectedly, with no retries left."""


class TaskUnschedulableError(RayError):
    """The task can never be scheduled (e.g. a hard node affinity to a dead node)."""


class ObjectLostError(RayError):
    """The object's value is gone (freed, or its node died) and cannot be rebuilt."""

    def __init__(self, object_ref_hex: str = "", message: str | None = None) -> None:
        self.object_ref_hex = object_ref_hex
        super().__init__(message or f"object {object_ref_hex} was lost")


class ObjectReconstructionFailedError(ObjectLostError):
    """The object was lost and rebuilding it from its lineage failed."""


class ObjectReconstructionFailedMaxAttemptsExceededError(ObjectReconstructionFailedError):
    """The object was lost and its task has run as often as ``max_retries`` allows."""


class RayActorError(RayError):
    """The actor is dead, or died before or while running the call (its message says
    why: the constructor raised, it was killed, its process died, it exited)."""

    def __init__(self, actor_id: str | None = None, message: str | None = None) -> None:
        self.actor_id = actor_id
        super().__init__(message or f"the actor {actor_id} died")


class ActorDiedError(RayActorError):
    """The actor died; every pending and later call raises this."""


class ObjectStoreFullError(RayError):
    """The object store cannot hold the object (``object_store_memory``)."""


def task_error_from(
    function_name: str, traceback_str: str, cause_blob: bytes | None, message: str
) -> RayTaskError:
    """Rebuilds a task's error; if the original exception cannot be unpickled here the
    error still carries the remote traceback (the cause is then None)."""
    cause: BaseException | None = None
    if cause_blob is not None:
        try:
            cause = pickle.loads(cause_blob)
        except Exception as exc:
            traceback_str += f"\n(the original exception could not be rebuilt here: {exc!r})"
    if isinstance(cause, RayTaskError):  # an upstream task's error, passed through
        return cause.as_instanceof_cause()
    return RayTaskError(function_name, traceback_str or message, cause).as_instanceof_cause()
