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


# -- the rest of ray.exceptions --------------------------------------------------------
# Ray programs name these in ``except`` clauses; those Cairn raises say so.


class ActorAlreadyExistsError(ValueError, RayError):
    """An actor of that name already exists in the namespace."""


class ActorHandleNotFoundError(ValueError, RayError):
    """An actor handle that cannot be found (a handle of a gone actor)."""


class ActorPlacementGroupRemoved(RayError):
    """The placement group of an actor was removed."""


class ActorUnavailableError(RayActorError):
    """The actor cannot take calls for now (it is restarting)."""


class ActorUnschedulableError(RayError):
    """The actor can never be scheduled."""


class AsyncioActorExit(RayError):
    """Raised inside an async actor to end it (exit_actor)."""


class AuthenticationError(RayError):
    """A call was refused for want of the cluster's token."""


class CrossLanguageError(RayError):
    """An error of another language's worker (Cairn runs Python only)."""


class LocalRayletDiedError(RayError):
    """The node daemon of the task's node died."""


class NodeDiedError(RayError):
    """The node the task ran on died."""


class ObjectFetchTimedOutError(ObjectLostError):
    """Fetching the object from another node took too long."""


class ObjectFreedError(ObjectLostError):
    """The object was freed (``internal.free``) while still referenced."""


class OwnerDiedError(ObjectLostError):
    """The process that owned the object died, so its value cannot be had."""


class ReferenceCountingAssertionError(ObjectLostError, AssertionError):
    """The object was deleted while a reference to it was still held."""


class ObjectRefStreamEndOfStreamError(RayError):
    """A streaming generator has no more values."""


class OufOfBandObjectRefSerializationException(RayError):
    """An ObjectRef was serialized out of band (Ray's spelling, kept)."""


class OutOfDiskError(RayError):
    """The node's disk is full (spilling, the GCS)."""


class OutOfMemoryError(RayError):
    """The node ran out of memory and the task's worker was killed."""


class PendingCallsLimitExceeded(RayError):
    """An actor's ``max_pending_calls`` was reached."""


class PlasmaObjectNotAvailable(RayError):
    """The object is not in the store (yet)."""


class RayCgraphCapacityExceeded(RaySystemError):
    """A compiled graph's capacity was exceeded."""


class RayChannelError(RaySystemError):
    """A compiled graph's channel failed."""


class RayChannelTimeoutError(RayChannelError, TimeoutError):
    """A compiled graph's channel timed out."""


class RayDirectTransportError(RaySystemError):
    """A direct transport of tensors failed."""


class RpcError(RayError):
    """A call between processes failed."""

    def __init__(self, message: str = "", rpc_code: int | None = None) -> None:
        self.rpc_code = rpc_code
        super().__init__(message)


class RuntimeEnvSetupError(RayError):
    """The task's or actor's runtime environment could not be set up."""


class StreamingGeneratorReplayInconsistentError(RaySystemError):
    """A streaming generator re-run for a lost value yielded other values."""


class TaskPlacementGroupRemoved(RayError):
    """The placement group of a task was removed."""


class UnserializableException(RayError):
    """A task's exception that could not be serialized."""


class UserCodeException(RayError):
    """An error in user code (raised inside Ray's own libraries)."""


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
