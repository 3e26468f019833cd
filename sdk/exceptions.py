"""Exceptions with Ray's names and meanings (``ray.exceptions``), defined in
dataplane/exceptions.py (a worker raises some of them too)."""

from dataplane.exceptions import (
    ActorDiedError,
    GetTimeoutError,
    ObjectLostError,
    ObjectReconstructionFailedError,
    ObjectReconstructionFailedMaxAttemptsExceededError,
    ObjectStoreFullError,
    RayActorError,
    RayError,
    RaySystemError,
    RayTaskError,
    TaskCancelledError,
    TaskUnschedulableError,
    WorkerCrashedError,
    task_error_from,
)

__all__ = [
    "ActorDiedError",
    "GetTimeoutError",
    "ObjectLostError",
    "ObjectReconstructionFailedError",
    "ObjectReconstructionFailedMaxAttemptsExceededError",
    "ObjectStoreFullError",
    "RayActorError",
    "RayError",
    "RaySystemError",
    "RayTaskError",
    "TaskCancelledError",
    "TaskUnschedulableError",
    "WorkerCrashedError",
    "task_error_from",
]
