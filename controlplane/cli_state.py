"""``cairn list``, ``cairn get`` and ``cairn summary``: Ray's state CLI (``ray list tasks
--filter "state=FAILED"``, ``ray get actors ID``, ``ray summary tasks``) over the log of
the running cluster or of ``--gcs-url`` (controlplane/state_api.py answers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import click

from controlplane import state_api
from controlplane.cli_options import (
    gcs_url_option,
    say_left_out,
    server_away_error,
    without_server_option,
)
from controlplane.gcs_url import resolve_gcs_url
from controlplane.sql_output import render
from controlplane.state_schema import SCHEMAS, StateSchema

_FORMATS = click.Choice(["default", "table", "json"])
_GETTABLE = ("actors", "jobs", "nodes", "objects", "placement-groups", "tasks", "workers")


def _kind(name: str) -> str:
    return name.replace("-", "_")


def _url(gcs_url: str | None, address: str | None) -> str:
    """--gcs-url (or $CAIRN_GCS_URL), else the cluster at --address running here, else
    this machine's running cluster."""
    url = resolve_gcs_url(gcs_url)
    if url is not None:
        return url
    try:
        return state_api.gcs_url_of(address)
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from None


def _run(coroutine: Any, without: tuple[int, ...]) -> Any:
    try:
        answer = asyncio.run(coroutine)
    except state_api.StateApiError as exc:
        raise server_away_error(exc) or click.ClickException(str(exc)) from None
    say_left_out(without)
    return answer


def _filter(text: str) -> tuple[str, str, str]:
    """Ray's --filter syntax: KEY=VALUE or KEY!=VALUE."""
    for predicate in ("!=", "="):
        key, found, value = text.partition(predicate)
        if found and key.strip():
            return key.strip(), predicate, value.strip()
    raise click.BadParameter(
        f"{text!r}: a filter is KEY=VALUE or KEY!=VALUE (e.g. state=FAILED)", param_hint="--filter"
    )


def _records(rows: list[StateSchema], columns: list[str]) -> list[dict[str, Any]]:
    return [{c: row[c] for c in columns} for row in rows]


def _print(records: list[dict[str, Any]], columns: list[str], output: str, *, table: bool) -> None:
    if output == "json" or (output == "default" and not table):
        click.echo(json.dumps(records, indent=2, default=str))
        return
    cells = [[_cell(r[c]) for c in columns] for r in records]
    click.echo(render([c.upper() for c in columns], cells, "table"), nl=False)


def _cell(value: Any) -> Any:
    return json.dumps(value, default=str) if isinstance(value, dict | list) else value


_address_option = click.option(
    "--address", default=None, help="The cluster running here whose head is at HOST:PORT."
)
_timeout_option = click.option(
    "--timeout", default=state_api.DEFAULT_TIMEOUT, show_default=True, help="Seconds."
)


@click.command("list")
@click.argument("resource", type=click.Choice([k.replace("_", "-") for k in SCHEMAS]))
@click.option(
    "--filter",
    "filters",
    multiple=True,
    help='KEY=VALUE or KEY!=VALUE on a filterable column, e.g. "state=FAILED" (repeat: all hold).',
)
@click.option(
    "--limit",
    default=state_api.DEFAULT_LIMIT,
    show_default=True,
    type=click.IntRange(min=1),
    help="At most this many rows (nothing else is cut).",
)
@click.option("--detail", is_flag=True, help="Every column, not only Ray's base ones.")
@click.option("--format", "output", type=_FORMATS, default="default", show_default=True)
@_timeout_option
@_address_option
@gcs_url_option
@without_server_option
def list_command(
    resource: str,
    filters: tuple[str, ...],
    limit: int,
    detail: bool,
    output: str,
    timeout: int,
    address: str | None,
    gcs_url: str | None,
    without: tuple[int, ...],
) -> None:
    """List RESOURCE (tasks, actors, objects, nodes, jobs, placement-groups, workers)
    from the log, as Ray's `ray list`; the oldest first."""
    kind = _kind(resource)
    schema = SCHEMAS[kind]
    parsed = [_filter(f) for f in filters]
    try:
        state_api.checked_filters(schema, parsed)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--filter") from None
    url = _url(gcs_url, address)
    rows = _run(
        state_api.list_states(
            url, kind, parsed, limit=limit, detail=detail, timeout=timeout, without=without
        ),
        without,
    )
    columns = schema.list_columns(detail=detail)
    _print(_records(rows, columns), columns, output, table=True)
    if len(rows) == limit:
        click.echo(
            f"(the first {limit} rows: pass --limit for more, or --filter for fewer)", err=True
        )


@click.command("get")
@click.argument("resource", type=click.Choice(_GETTABLE))
@click.argument("entity_id")
@click.option("--format", "output", type=_FORMATS, default="default", show_default=True)
@_timeout_option
@_address_option
@gcs_url_option
@without_server_option
def get_command(
    resource: str,
    entity_id: str,
    output: str,
    timeout: int,
    address: str | None,
    gcs_url: str | None,
    without: tuple[int, ...],
) -> None:
    """Show one RESOURCE by id with every column, as Ray's `ray get` (a task: each of
    its attempts)."""
    kind = _kind(resource)
    url = _url(gcs_url, address)
    rows = _run(
        state_api.get_states(url, kind, entity_id, timeout=timeout, without=without), without
    )
    if not rows:
        raise click.ClickException(f"no {resource[:-1].replace('-', ' ')} {entity_id!r} in the log")
    columns = SCHEMAS[kind].list_columns()
    _print(_records(rows, columns), columns, output, table=False)


@click.command("summary")
@click.argument("resource", type=click.Choice(["tasks", "actors", "objects"]))
@click.option("--format", "output", type=_FORMATS, default="default", show_default=True)
@_timeout_option
@_address_option
@gcs_url_option
@without_server_option
def summary_command(
    resource: str,
    output: str,
    timeout: int,
    address: str | None,
    gcs_url: str | None,
    without: tuple[int, ...],
) -> None:
    """Count RESOURCE (tasks by function, actors by class, objects) by state, as Ray's
    `ray summary`."""
    url = _url(gcs_url, address)
    summary = _run(state_api.summarize(url, resource, timeout=timeout, without=without), without)
    summary = summary["cluster"]
    if output == "json":
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    _TABLES[resource](summary)


def _counted(summary: dict[str, Any], key: str, counts: str, title: str) -> None:
    rows = [
        [name, *([entry["type"]] if "type" in entry else []), _cell(entry[counts])]
        for name, entry in summary["summary"].items()
    ]
    has_type = any("type" in entry for entry in summary["summary"].values())
    columns = [key.upper(), *(["TYPE"] if has_type else []), "STATE_COUNTS"]
    click.echo(title)
    click.echo(render(columns, rows, "table"), nl=False)


def _tasks_table(summary: dict[str, Any]) -> None:
    _counted(
        summary,
        "func_or_class_name",
        "state_counts",
        f"{summary['total_tasks']} tasks, {summary['total_actor_tasks']} actor tasks, "
        f"{summary['total_actor_scheduled']} actors scheduled",
    )


def _actors_table(summary: dict[str, Any]) -> None:
    _counted(summary, "class_name", "state_counts", f"{summary['total_actors']} actors")


def _objects_table(summary: dict[str, Any]) -> None:
    click.echo(
        f"{summary['total_objects']} objects, {summary['total_size_mb']:.3f} MiB"
        " (call sites are not recorded)"
    )
    rows = [
        [site, e["total_objects"], f"{e['total_size_mb']:.3f}", _cell(e["task_state_counts"])]
        for site, e in summary["summary"].items()
    ]
    click.echo(
        render(["CALL_SITE", "OBJECTS", "SIZE_MB", "TASK_STATE_COUNTS"], rows, "table"), nl=False
    )


_TABLES: dict[str, Callable[[dict[str, Any]], None]] = {
    "tasks": _tasks_table,
    "actors": _actors_table,
    "objects": _objects_table,
}
