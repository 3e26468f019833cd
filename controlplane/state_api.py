"""Ray's state API over the log: list, get and summarize tasks, actors, objects, nodes,
jobs, placement groups and workers, as Ray's ``ray.util.state`` answers them
(``sdk.util.state`` and ``cairn list/get/summary`` call this module).

Each answer is one read-only query over the SQL views (controlplane/sql/
state_queries.sql), filtered, ordered and limited in PostgreSQL: nothing is truncated
but by the caller's ``limit``, and the same calls answer from the log of a cluster
that is gone (a GCS URL). Ray's filters are ``(column, "=" | "!=", value)``, on the
filterable columns of the state dataclass (controlplane/state_schema.py); string values
compare case-insensitively, as Ray's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from controlplane.errors import GcsError
from controlplane.eventlog.clock import PROCESS_CLOCK
from controlplane.gcs_url import normalize, redact
from controlplane.readonly_sql import audit_transaction
from controlplane.sql import load_queries
from controlplane.state_schema import SCHEMAS, StateSchema

queries: dict[str, str] = load_queries(Path(__file__).with_name("sql") / "state_queries.sql")

DEFAULT_LIMIT = 100  # Ray's
DEFAULT_TIMEOUT = 30  # Ray's, seconds
PREDICATES = ("=", "!=")

# Cairn's task states (controlplane/projections/spec.py) as Ray's TaskStatus: Cairn says
# why a task waits (infeasible, spilled, retrying), Ray only that it waits for a node.
TASK_STATES: dict[str, str] = {
    "WAITING_FOR_DEPENDENCIES": "PENDING_ARGS_AVAIL",
    "SUBMITTED": "PENDING_NODE_ASSIGNMENT",
    "PENDING_NODE_ASSIGNMENT": "PENDING_NODE_ASSIGNMENT",
    "INFEASIBLE": "PENDING_NODE_ASSIGNMENT",
    "RETRYING": "PENDING_NODE_ASSIGNMENT",
    "RECONSTRUCTING": "PENDING_NODE_ASSIGNMENT",
    "SCHEDULED": "SUBMITTED_TO_WORKER",
    "RUNNING": "RUNNING",
    "FINISHED": "FINISHED",
    "FAILED": "FAILED",
    "CANCELLED": "FAILED",
}
# The kind of a logged error (dataplane/protocol.py ErrorInfo) as Ray's ErrorType; any
# other kind is shown upper-cased.
ERROR_TYPES: dict[str, str] = {
    "task_error": "TASK_EXECUTION_EXCEPTION",
    "worker_crashed": "WORKER_DIED",
    "cancelled": "TASK_CANCELLED",
    "object_lost": "OBJECT_LOST",
    "actor_died": "ACTOR_DIED",
    "actor_exit": "ACTOR_DIED",
    "actor_unavailable": "ACTOR_UNAVAILABLE",
    "unschedulable": "TASK_UNSCHEDULABLE_ERROR",
    "runtime_env_setup": "RUNTIME_ENV_SETUP_FAILED",
    "system": "SYSTEM_ERROR",
}
_PARAMETERS: dict[str, tuple[Any, ...]] = {
    "tasks": (json.dumps(TASK_STATES), json.dumps(ERROR_TYPES)),
    "objects": (json.dumps(TASK_STATES),),
}

Filter = tuple[str, str, str | bool | int | float]


class StateApiError(GcsError):
    """The state API could not answer: the GCS was unreachable, or the query did not
    finish within its timeout."""


def schema_of(kind: str) -> type[StateSchema]:
    """The dataclass of ``kind`` (tasks, actors, ...); ValueError naming the kinds."""
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise ValueError(
            f"unknown resource {kind!r}: one of {', '.join(sorted(SCHEMAS))}"
        ) from None


def checked_filters(
    schema: type[StateSchema], filters: Sequence[Filter] | None
) -> list[tuple[str, str, str]]:
    """Ray's filters as (column, predicate, value text); ValueError for a filter that is
    not a (key, predicate, value) triple, a predicate other than = and !=, or a column
    that cannot be filtered on (naming those that can)."""
    checked = []
    for item in filters or []:
        if not isinstance(item, tuple | list) or len(item) != 3:
            raise ValueError(
                f"the given filter has incorrect input type, {item!r}. "
                "Provide (key, predicate, value) tuples."
            )
        key, predicate, value = item
        if predicate not in PREDICATES:
            raise ValueError(
                f"Unsupported filter predicate {predicate} is given. Available predicates: =, !=."
            )
        column = str(key).lower()
        if column not in schema.filterable_columns():
            raise ValueError(
                f"The given filter column {key} is not supported. Supported filter columns: "
                f"{sorted(schema.filterable_columns())}"
            )
        if not isinstance(value, str | bool | int | float):
            raise ValueError(f"filter value for {key} must be a str, bool, int or float: {value!r}")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        checked.append((column, predicate, text))
    return checked


def list_statement(
    schema: type[StateSchema],
    filters: Sequence[Filter] | None,
    *,
    detail: bool,
    limit: int | None,
) -> tuple[str, list[Any]]:
    """The SQL of a listing and its arguments: the kind's query wrapped in the columns
    asked for (only Ray's base ones without ``detail``: the rest are not computed), the
    filters and the limit. Column names come from the schema, values are arguments."""
    args: list[Any] = list(_PARAMETERS.get(schema.KIND, ()))
    conditions = []
    for column, predicate, value in checked_filters(schema, filters):
        args.append(value)
        test = "IS NOT DISTINCT FROM" if predicate == "=" else "IS DISTINCT FROM"
        conditions.append(f"lower(s.{column}::text) {test} lower(${len(args)})")
    columns = ", ".join(f"s.{c}" for c in schema.list_columns(detail=detail))
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    statement = (
        f"SELECT {columns} FROM ({queries['state_' + schema.KIND]}) s{where}"
        f" ORDER BY s.sort_key, s.{schema.ID}"
    )
    if limit is not None:
        args.append(limit)
        statement += f" LIMIT ${len(args)}"
    return statement, args


async def list_states(
    url: str,
    kind: str,
    filters: Sequence[Filter] | None = None,
    *,
    limit: int | None = DEFAULT_LIMIT,
    detail: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    explain: Callable[[str], None] | None = None,
    without: Sequence[int] = (),
) -> list[StateSchema]:
    """Ray's ``list_<kind>``: every row that passes the filters, in the order they were
    created, at most ``limit`` (None: all). ``without``: servers of the log left out
    (``readonly_sql.audit_transaction``; the command line's ``--without-server``)."""
    schema = schema_of(kind)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, not {limit!r}")
    statement, args = list_statement(schema, filters, detail=detail, limit=limit)
    rows = await _fetch(url, kind, [(statement, args)], timeout, explain, without)
    return [_state(schema, row) for row in rows[0]]


async def get_states(
    url: str,
    kind: str,
    entity_id: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    explain: Callable[[str], None] | None = None,
    without: Sequence[int] = (),
) -> list[StateSchema]:
    """Every row of ``kind`` with that id, with detail (a task's attempts, oldest
    first; one row or none for the others)."""
    filters: list[Filter] = [(schema_of(kind).ID, "=", entity_id)]
    return await list_states(
        url,
        kind,
        filters,
        limit=None,
        detail=True,
        timeout=timeout,
        explain=explain,
        without=without,
    )


async def summarize(
    url: str,
    kind: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    explain: Callable[[str], None] | None = None,
    without: Sequence[int] = (),
) -> dict[str, Any]:
    """Ray's ``summarize_<kind>`` (tasks, actors, objects): ``{"cluster": summary}``,
    counted in PostgreSQL over every row of the kind."""
    if kind not in _SUMMARIES:
        raise ValueError(f"cannot summarize {kind!r}: one of {', '.join(_SUMMARIES)}")
    source = f"({queries['state_' + kind]}) s"
    args = list(_PARAMETERS.get(kind, ()))
    statements = [(sql.format(source=source), args) for sql in _SUMMARIES[kind][0]]
    results = await _fetch(url, f"{kind} summary", statements, timeout, explain, without)
    return {"cluster": _SUMMARIES[kind][1](*results)}


def _tasks_summary(rows: list[asyncpg.Record]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    totals = {"NORMAL_TASK": 0, "ACTOR_TASK": 0, "ACTOR_CREATION_TASK": 0}
    for row in rows:
        name = row["func_or_class_name"]
        entry = summary.setdefault(
            name, {"func_or_class_name": name, "type": row["type"], "state_counts": {}}
        )
        entry["state_counts"][row["state"]] = row["count"]
        totals[row["type"]] = totals.get(row["type"], 0) + row["count"]
    return {
        "summary": summary,
        "total_tasks": totals["NORMAL_TASK"],
        "total_actor_tasks": totals["ACTOR_TASK"],
        "total_actor_scheduled": totals["ACTOR_CREATION_TASK"],
        "summary_by": "func_name",
    }


def _actors_summary(rows: list[asyncpg.Record]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for row in rows:
        entry = summary.setdefault(
            row["class_name"], {"class_name": row["class_name"], "state_counts": {}}
        )
        entry["state_counts"][row["state"]] = row["count"]
    return {
        "summary": summary,
        "total_actors": sum(row["count"] for row in rows),
        "summary_by": "class",
    }


def _objects_summary(
    counts: list[asyncpg.Record], per_site: list[asyncpg.Record]
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for row in per_site:
        summary[row["call_site"]] = {
            "total_objects": row["objects"],
            "total_size_mb": (row["size"] or 0) / 1024**2,
            "total_num_workers": row["workers"],
            "total_num_nodes": row["nodes"],
            "task_state_counts": {},
            "ref_type_counts": {},
        }
    for row in counts:
        entry = summary[row["call_site"]]
        states, refs = entry["task_state_counts"], entry["ref_type_counts"]
        states[row["task_status"]] = states.get(row["task_status"], 0) + row["count"]
        refs[row["reference_type"]] = refs.get(row["reference_type"], 0) + row["count"]
    return {
        "summary": summary,
        "total_objects": sum(e["total_objects"] for e in summary.values()),
        "total_size_mb": sum(e["total_size_mb"] for e in summary.values()),
        "callsite_enabled": "disabled" not in summary,
        "summary_by": "callsite",
    }


# per kind: the statements (over {source}, the kind's query) and what builds Ray's shape
_SUMMARIES: dict[str, tuple[list[str], Callable[..., dict[str, Any]]]] = {
    "tasks": (
        [
            "SELECT func_or_class_name, type, state, count(*) AS count FROM {source}"
            " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ],
        _tasks_summary,
    ),
    "actors": (
        ["SELECT class_name, state, count(*) AS count FROM {source} GROUP BY 1, 2 ORDER BY 1, 2"],
        _actors_summary,
    ),
    "objects": (
        [
            "SELECT call_site, task_status, reference_type, count(*) AS count FROM {source}"
            " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            "SELECT call_site, count(*) AS objects, (sum(object_size) FILTER"
            " (WHERE object_size >= 0))::float8 AS size, count(DISTINCT pid) AS workers,"
            " count(DISTINCT ip) AS nodes FROM {source} GROUP BY 1 ORDER BY 1",
        ],
        _objects_summary,
    ),
}


async def _fetch(
    url: str,
    what: str,
    statements: list[tuple[str, list[Any]]],
    timeout: float,
    explain: Callable[[str], None] | None,
    without: Sequence[int] = (),
) -> list[list[asyncpg.Record]]:
    """The rows of each statement, in one read-only transaction; StateApiError if the
    GCS cannot be reached or a statement outlasts ``timeout`` seconds. The process's
    clock moves past what they were read from (``sdk.util.state`` tells its daemon)."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    started = time.monotonic()
    try:
        async with audit_transaction(url, timeout=timeout, without=without) as conn:
            results = [await conn.fetch(sql, *args) for sql, args in statements]
            PROCESS_CLOCK.saw(await conn.fetchval(queries["log_seen"]))
    except asyncpg.QueryCanceledError:
        raise StateApiError(
            f"the state API's query for {what} did not finish within {timeout}s "
            f"(GCS {redact(url)}); pass a larger timeout"
        ) from None
    except (OSError, asyncpg.PostgresError) as exc:
        raise StateApiError(
            f"the state API could not read {what} from {redact(url)}: {exc}"
        ) from exc
    if explain is not None:
        explain(
            f"{what}: {sum(map(len, results))} rows in {time.monotonic() - started:.3f}s "
            f"from {redact(url)}"
        )
    return results


def _state(schema: type[StateSchema], row: asyncpg.Record) -> StateSchema:
    values = {}
    for name, value in row.items():
        if isinstance(value, str) and _is_json(schema, name):
            value = json.loads(value)
        values[name] = value
    return schema(**values)


def _is_json(schema: type[StateSchema], column: str) -> bool:
    annotation = str(schema.__dataclass_fields__[column].type)  # type: ignore[attr-defined]
    return annotation.startswith(("dict", "list"))


def gcs_url_of(address: str | None) -> str:
    """The GCS URL the state API reads, from Ray's ``address``: a PostgreSQL URL as it
    is (a cluster that is gone answers from its log), else the GCS of the cluster
    running on this machine (``None`` or "auto": its head; "HOST:PORT": the cluster
    whose head is there), asked of its node; ConnectionError if none runs."""
    if address is not None and address.split("://", 1)[0].startswith("postgres"):
        return normalize(address)
    if address is not None and "://" in address:
        raise ValueError(
            f"address {redact(address)!r}: the state API reads a PostgreSQL URL "
            "(postgresql://...), 'auto', or the HOST:PORT of a cluster running here"
        )
    from controlplane import node_records
    from dataplane.client import CoreClient

    session_dir = node_records.find_running(None if address in (None, "auto") else address)
    client = CoreClient(str(session_dir / node_records.NODE_SOCKET), "observer")
    try:
        return client.welcome.gcs_url
    finally:
        client.close()
