"""Ray's state API (``ray.util.state``): list, get and summarize what a cluster ran,
answered from its log by the control plane (controlplane/state_api.py).

``address``: None means the cluster this process is connected to (else, as "auto",
the one running on this machine); a PostgreSQL URL reads that log directly, also after
its cluster stopped. Nothing is truncated but by ``limit`` (Ray's default, 100; pass a
larger one for more), so ``raise_on_missing_output`` never has cause to raise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from typing import Any, TypeVar

from controlplane import state_api
from controlplane.errors import GcsError
from sdk.util.state.common import (
    DEFAULT_LIMIT,
    DEFAULT_RPC_TIMEOUT,
    ActorState,
    JobState,
    NodeState,
    ObjectState,
    PlacementGroupState,
    StateSchema,
    TaskState,
    WorkerState,
)
from sdk.util.state.exception import RayStateApiException

T = TypeVar("T")
Filters = list[tuple[str, str, str | bool | int | float]] | None


def _gcs_url(address: str | None) -> str:
    if address is None:
        from sdk.runtime import is_initialized
        from sdk.runtime_context import get_runtime_context

        if is_initialized():
            return get_runtime_context().gcs_address
    try:
        return state_api.gcs_url_of(address)
    except ConnectionError as exc:
        raise ConnectionError(f"the state API found no cluster to ask: {exc}") from None


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs a state query to its end, in a thread of its own (the caller may be inside
    an event loop: an async actor); the control plane's errors as Ray's."""
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coroutine).result()
    except GcsError as exc:
        raise RayStateApiException(str(exc)) from exc


def _explainer(explain: bool) -> Any:
    return print if explain else None


def _list(
    kind: str,
    address: str | None,
    filters: Filters,
    limit: int,
    timeout: int,
    detail: bool,
    explain: bool,
) -> list[Any]:
    state_api.checked_filters(state_api.schema_of(kind), filters)  # bad ones before connecting
    url = _gcs_url(address)
    return _run(
        state_api.list_states(
            url,
            kind,
            filters,
            limit=limit,
            detail=detail,
            timeout=timeout,
            explain=_explainer(explain),
        )
    )


def _get(kind: str, entity_id: str, address: str | None, timeout: int, explain: bool) -> list[Any]:
    if not isinstance(entity_id, str):
        raise TypeError(f"the id of a {kind[:-1]} is a str, not {type(entity_id).__name__}")
    url = _gcs_url(address)
    return _run(
        state_api.get_states(url, kind, entity_id, timeout=timeout, explain=_explainer(explain))
    )


def _one(found: list[Any]) -> Any:
    return found[0] if found else None


def list_tasks(
    address: str | None = None,
    filters: Filters = None,
    limit: int = DEFAULT_LIMIT,
    timeout: int = DEFAULT_RPC_TIMEOUT,
    detail: bool = False,
    raise_on_missing_output: bool = True,
    _explain: bool = False,
) -> list[TaskState]:
    """Task attempts (a retried task has one row per attempt), oldest first."""
    return _list("tasks", address, filters, limit, timeout, detail, _explain)


def list_actors(
    address: str | None = None,
    filters: Filters = None,
    limit: int = DEFAULT_LIMIT,
    timeout: int = DEFAULT_RPC_TIMEOUT,
    detail: bool = False,
    raise_on_missing_output: bool = True,
    _explain: bool = False,
) -> list[ActorState]:
    return _list("actors", address, filters, limit, timeout, detail, _explain)


def list_objects(
    address: str | None = None,
    filters: Filters = None,
    limit: int = DEFAULT_LIMIT,
    timeout: int = DEFAULT_RPC_TIMEOUT,
    detail: bool = False,
    raise_on_missing_output: bool = True,
    _explain: bool = False,
) -> list[ObjectState]:
    """Every object the log knows, freed ones too (filter on ``state``)."""
    return _list("objects", address, filters, limit, timeout, detail, _explain)


def list_nodes(
    address: str | None = None,
    filters: Filters = None,
    limit: int = DEFAULT_LIMIT,
    timeout: int = DEFAULT_RPC_TIMEOUT,
    detail: bool = False,
    raise_on_missing_output: bool = True,
    _explain: bool = False,
) -> list[NodeState]:
    return _list("nodes", address, filters, limit, timeout, detail, _explain)


def list_jobs(
    address: str | None = None,
    filters: Filters = None,
    limit: int = DEFAULT_LIMIT,
    timeout: int = DEFAULT_RPC_TIMEOUT,
    detail: bool = False,
    raise_on_missing_output: bool = True,
    _explain: bool = False,
) -> list[JobState]:
    return _list("jobs", address, filters, limit, timeout, detail, _explain)


def list_placement_groups(
    address: str | None = None,
    filters: Filters = None,
    limit: int = DEFAULT_LIMIT,
    timeout: int = DEFAULT_RPC_TIMEOUT,
    detail: bool = False,
    raise_on_missing_output: bool = True,
    _explain: bool = False,
) -> list[PlacementGroupState]:
    return _list("placement_groups", address, filters, limit, timeout, detail, _explain)


def list_workers(
    address: str | None = None,
    filters: Filters = None,
    limit: int = DEFAULT_LIMIT,
    timeout: int = DEFAULT_RPC_TIMEOUT,
    detail: bool = False,
    raise_on_missing_output: bool = True,
    _explain: bool = False,
) -> list[WorkerState]:
    """Worker processes (drivers are not listed)."""
    return _list("workers", address, filters, limit, timeout, detail, _explain)


def get_task(
    id: Any, address: str | None = None, timeout: int = DEFAULT_RPC_TIMEOUT, _explain: bool = False
) -> TaskState | list[TaskState] | None:
    """A task by id (or by an ObjectRef it returned): None if unknown, its TaskState,
    or as Ray, a list of them when it ran more than once (retries)."""
    task_id = id if isinstance(id, str) else id.task_id()
    found = _get("tasks", task_id, address, timeout, _explain)
    return found if len(found) > 1 else _one(found)


def get_actor(
    id: str, address: str | None = None, timeout: int = DEFAULT_RPC_TIMEOUT, _explain: bool = False
) -> ActorState | None:
    return _one(_get("actors", id, address, timeout, _explain))


def get_node(
    id: str, address: str | None = None, timeout: int = DEFAULT_RPC_TIMEOUT, _explain: bool = False
) -> NodeState | None:
    return _one(_get("nodes", id, address, timeout, _explain))


def get_job(
    id: str, address: str | None = None, timeout: int = DEFAULT_RPC_TIMEOUT, _explain: bool = False
) -> JobState | None:
    """A job by its id (Cairn's jobs are drivers' and have no submission id)."""
    return _one(_get("jobs", id, address, timeout, _explain))


def get_placement_group(
    id: str, address: str | None = None, timeout: int = DEFAULT_RPC_TIMEOUT, _explain: bool = False
) -> PlacementGroupState | None:
    return _one(_get("placement_groups", id, address, timeout, _explain))


def get_worker(
    id: str, address: str | None = None, timeout: int = DEFAULT_RPC_TIMEOUT, _explain: bool = False
) -> WorkerState | None:
    return _one(_get("workers", id, address, timeout, _explain))


def get_objects(
    id: str, address: str | None = None, timeout: int = DEFAULT_RPC_TIMEOUT, _explain: bool = False
) -> list[ObjectState]:
    """As Ray, a list: empty if the log has no such object."""
    return _get("objects", id, address, timeout, _explain)


def _summary(kind: str, address: str | None, timeout: int, explain: bool) -> dict[str, Any]:
    url = _gcs_url(address)
    return _run(state_api.summarize(url, kind, timeout=timeout, explain=_explainer(explain)))


def summarize_tasks(
    address: str | None = None,
    timeout: int = DEFAULT_RPC_TIMEOUT,
    raise_on_missing_output: bool = True,
    _explain: bool = False,
) -> dict[str, Any]:
    """``{"cluster": TaskSummaries as a dict}``: attempts counted by function and state."""
    return _summary("tasks", address, timeout, _explain)


def summarize_actors(
    address: str | None = None,
    timeout: int = DEFAULT_RPC_TIMEOUT,
    raise_on_missing_output: bool = True,
    _explain: bool = False,
) -> dict[str, Any]:
    """``{"cluster": ActorSummaries as a dict}``: actors counted by class and state."""
    return _summary("actors", address, timeout, _explain)


def summarize_objects(
    address: str | None = None,
    timeout: int = DEFAULT_RPC_TIMEOUT,
    raise_on_missing_output: bool = True,
    _explain: bool = False,
) -> dict[str, Any]:
    """``{"cluster": ObjectSummaries as a dict}`` (call sites are not recorded: one
    group, "disabled", as Ray without RAY_record_ref_creation_sites)."""
    return _summary("objects", address, timeout, _explain)


def _logs_not_yet(name: str) -> RayStateApiException:
    return RayStateApiException(
        f"{name}() is not available yet: Cairn does not serve workers' log files through "
        "the state API (see `cairn logs`, issue 19)"
    )


def list_logs(*args: Any, **kwargs: Any) -> dict[str, list[str]]:
    """Not yet: raises RayStateApiException."""
    raise _logs_not_yet("list_logs")


def get_log(*args: Any, **kwargs: Any) -> Any:
    """Not yet: raises RayStateApiException."""
    raise _logs_not_yet("get_log")


__all__ = [
    "ActorState",
    "JobState",
    "NodeState",
    "ObjectState",
    "PlacementGroupState",
    "RayStateApiException",
    "StateSchema",
    "TaskState",
    "WorkerState",
    "get_actor",
    "get_job",
    "get_log",
    "get_node",
    "get_objects",
    "get_placement_group",
    "get_task",
    "get_worker",
    "list_actors",
    "list_jobs",
    "list_logs",
    "list_nodes",
    "list_objects",
    "list_placement_groups",
    "list_tasks",
    "list_workers",
    "summarize_actors",
    "summarize_objects",
    "summarize_tasks",
]
