"""Who this process is in the cluster: its core client (driver or worker) and, in a
worker, the task it is running. The SDK reads these; the worker sets them."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

from dataplane import protocol as p
from dataplane.client import CoreClient


@dataclass
class TaskContext:
    task_id: str
    job_id: str
    attempt: int
    gpu_ids: tuple[str, ...] = ()  # the GPUs of the task (or of its actor)
    # the placement group its child tasks run in (a strategy tuple), if it captures them
    captured_placement: tuple[str, ...] | None = None
    cancelled: bool = False  # ray.cancel reached it while it ran (is_canceled())
    in_async_actor: bool = False  # (where is_canceled() is refused, as in Ray)
    # what RuntimeContext tells a task about itself
    name: str = ""  # its spec's (the function's module.qualname unless named)
    function: Any = None  # what it runs (a function, a bound method, a class)
    resources: dict[str, float] | None = None  # what it was given (its spec's: read only)
    actor_id: str | None = None
    actor_options: p.ActorOptions | None = None  # its actor's (name, class, methods)
    actor_restarted: bool = False  # the actor's constructor ran again after a death
    namespace: str | None = None  # its job's (its actor's, for a call), from its spec
    placement_group_id: str | None = None  # the group it (or its actor) runs in
    runtime_env: dict[str, Any] | None = None  # its own (an actor call: its actor's)


class ActorExit(BaseException):
    """Raised by ``exit_actor()`` inside an actor method: the actor ends after it."""


_client: CoreClient | None = None
# A ContextVar: calls running concurrently in one actor (threads or asyncio tasks) each
# see their own task.
_task: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "cairn_task", default=None
)


def current_client() -> CoreClient | None:
    return _client


def set_client(client: CoreClient | None) -> None:
    global _client
    _client = client


def current_task() -> TaskContext | None:
    return _task.get()


def set_task(task: TaskContext | None) -> None:
    _task.set(task)
