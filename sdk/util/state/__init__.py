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
import fnmatch
import re
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from controlplane import logs, state_api
from controlplane.errors import GcsError
from controlplane.eventlog.clock import PROCESS_CLOCK
from dataplane import protocol as p
from dataplane.context import current_client
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
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
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
    an event loop: an async actor); the control plane's errors as Ray's. The daemon of
    a process connected to a cluster is told how far the answer read the log."""
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(asyncio.run, coroutine).result()
    except (GcsError, logs.LogsError) as exc:
        raise RayStateApiException(str(exc)) from exc
    if (client := current_client()) is not None:  # (a message per state query: cheap)
        client.send(p.LogSeen(PROCESS_CLOCK.position))
    return answer


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
    task_id = id if isinstance(id, str) else id.task_id().hex()
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


def _log_reader(address: str | None, timeout: int, **more: Any) -> logs.LogReader:
    """Reads logs through the log; the files of this driver's own node (a private
    cluster has no gRPC service) and of this machine's nodes directly."""
    from sdk.runtime import is_initialized
    from sdk.runtime_context import get_runtime_context

    here = [Path(get_runtime_context().get_temp_dir())] if is_initialized() else []
    return logs.LogReader(_gcs_url(address), here, float(timeout), **more)


def _node(reader: logs.LogReader, node_id: str | None, node_ip: str | None) -> str:
    if node_id is not None:
        return node_id
    if node_ip is not None:
        return _run(reader.node_of_ip(node_ip))
    raise ValueError("node_id or node_ip must be given")


def list_logs(
    address: str | None = None,
    node_id: str | None = None,
    node_ip: str | None = None,
    glob_filter: str | None = None,
    timeout: int = DEFAULT_RPC_TIMEOUT,
) -> dict[str, list[str]]:
    """A node's log files by group, as Ray's: ``worker_out`` and ``worker_err`` (each
    worker's stdout and stderr, rotated copies too), ``internal`` (the rest)."""
    reader = _log_reader(address, timeout)
    files = _run(reader.node_files(_node(reader, node_id, node_ip)))
    groups: dict[str, list[str]] = {}
    for entry in files:
        name = entry["name"]
        if glob_filter is not None and not fnmatch.fnmatch(name, glob_filter):
            continue
        group = "internal"
        if name.startswith("worker-"):
            group = "worker_err" if ".err" in name else "worker_out"
        groups.setdefault(group, []).append(name)
    return groups


def get_log(
    address: str | None = None,
    node_id: str | None = None,
    node_ip: str | None = None,
    filename: str | None = None,
    actor_id: str | None = None,
    task_id: str | None = None,
    pid: int | None = None,
    follow: bool = False,
    tail: int = -1,
    timeout: int = DEFAULT_RPC_TIMEOUT,
    suffix: str = "out",
    encoding: str | None = "utf-8",
    errors: str | None = "strict",
    submission_id: str | None = None,
    attempt_number: int = 0,
    _interval: float | None = None,
    filter_ansi_code: bool = False,
) -> Iterator[str]:
    """A log's lines, one per item: of a file of a node (``filename`` with ``node_id``
    or ``node_ip``), an actor (``actor_id``), a task's attempt (``task_id``,
    ``attempt_number``), a worker (``pid``) or a job submission's driver
    (``submission_id``); ``follow`` keeps yielding new lines (for a task, until its
    attempt ended; for a submission, until it ended)."""
    if suffix not in ("out", "err"):
        raise ValueError(f"suffix must be 'out' or 'err', got {suffix!r}")
    given = [
        n
        for n, v in (
            ("filename", filename),
            ("actor_id", actor_id),
            ("task_id", task_id),
            ("pid", pid),
            ("submission_id", submission_id),
        )
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError("give exactly one of filename, actor_id, task_id, pid, submission_id")
    reader = _log_reader(address, timeout, encoding=encoding or "utf-8", errors=errors or "strict")
    fetch: Callable[[], Coroutine[Any, Any, logs.Lines]]
    ended: Callable[[], Coroutine[Any, Any, bool]] | None = None
    if filename is not None:
        node = _node(reader, node_id, node_ip)
        fetch = lambda: reader.file_lines(node, filename)  # noqa: E731
    elif actor_id is not None:
        fetch = lambda: reader.actor_lines(actor_id, suffix)  # noqa: E731
    elif task_id is not None:
        fetch = lambda: reader.task_lines(task_id, attempt_number, suffix)  # noqa: E731
        if follow:  # (a task not started yet is waited for)
            fetch = lambda: reader.task_lines_once_started(task_id, attempt_number, suffix)  # noqa: E731
        ended = lambda: reader.task_ended(task_id, attempt_number)  # noqa: E731
    elif submission_id is not None:  # (a job submission's driver: its file on the head)
        fetch = lambda: reader.submission_lines(submission_id)  # noqa: E731
        ended = lambda: reader.submission_ended(submission_id)  # noqa: E731
    else:
        assert pid is not None
        on = None if node_id is None and node_ip is None else _node(reader, node_id, node_ip)
        worker_id = _run(reader.worker_of_pid(int(pid), on))
        fetch = lambda: reader.worker_lines(worker_id, suffix)  # noqa: E731

    def shown(line: str) -> str:
        return _ANSI.sub("", line) if filter_ansi_code else line

    if not follow:
        for line in logs.tail(_run(fetch()).lines, tail):
            yield shown(line)
        return
    interval = _interval if _interval is not None else logs.FOLLOW_INTERVAL_S
    lines = logs.follow(fetch, ended, tail, interval)
    loop = asyncio.new_event_loop()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # (the caller may be async)
            while True:
                try:
                    line = pool.submit(loop.run_until_complete, anext(lines)).result()
                except StopAsyncIteration:
                    return
                except logs.LogsError as exc:
                    raise RayStateApiException(str(exc)) from exc
                yield shown(line)
    finally:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(loop.run_until_complete, lines.aclose()).result()
            loop.close()


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
