"""The ``cairn`` command line."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from controlplane.cli_job import job
from controlplane.cli_logs import logs_command
from controlplane.cli_options import (
    gcs_url_option,
    reading_the_log,
    require_url,
    without_server_option,
)
from controlplane.cli_start import start, stop
from controlplane.cli_state import get_command, list_command, summary_command
from controlplane.errors import GcsError
from controlplane.gcs_url import redact, resolve_gcs_url

if TYPE_CHECKING:
    from dataplane.client import CoreClient


@click.group()
def main() -> None:
    """Cairn: Ray's programming model on an event-sourced PostgreSQL log."""


main.add_command(start)
main.add_command(stop)
main.add_command(list_command)
main.add_command(get_command)
main.add_command(summary_command)
main.add_command(job)
main.add_command(logs_command)


@main.command()
@gcs_url_option
@click.option("--writers", default=4, show_default=True, help="Writer processes.")
@click.option("--tasks", default=2500, show_default=True, help="Tasks per writer.")
def demo(gcs_url: str | None, writers: int, tasks: int) -> None:
    """Append and tail a real workload of task events; print what was measured."""
    from controlplane.demo import run_demo

    run_demo(gcs_url, writers=writers, tasks_per_writer=tasks)


@main.command()
@gcs_url_option
@click.option("--revision", default="head", show_default=True)
@click.option(
    "--log-shards",
    type=click.IntRange(1, 1024),
    default=None,
    help="Give the log this many shards from now on (a single-shard log keeps its events "
    "as shard 0; see controlplane/README.md, 'The sharded log').",
)
def migrate(gcs_url: str | None, revision: str, log_shards: int | None) -> None:
    """Bring the log's schema up to a revision."""
    from controlplane import schema
    from controlplane.gcs import check_reachable

    url = require_url(gcs_url)
    check_reachable(url)
    schema.upgrade(url, revision)
    others = _log_owner_urls(url)[1:] if revision == "head" else []
    for other in others:  # (a log on several servers: its servers 1.., with server 0's login)
        check_reachable(other)
        schema.upgrade(other, revision)
    click.echo(f"schema at {revision}" + (f" on {1 + len(others)} servers" if others else ""))
    if log_shards is not None:
        if revision != "head":
            raise click.UsageError("--log-shards needs the schema at head (--revision head)")
        before = schema.log_shards(url)
        schema.set_log_shards(url, log_shards)
        click.echo(f"log shards: {before} -> {log_shards}")


@main.group()
def partitions() -> None:
    """Manage the log's partitions."""


@partitions.command("list")
@gcs_url_option
def partitions_list(gcs_url: str | None) -> None:
    """Show every partition with its position range and state."""
    from controlplane.eventlog.partitions import PartitionManager

    urls = _log_owner_urls(gcs_url)
    for index, url in enumerate(urls):
        if len(urls) > 1:  # (each server its own partitions, of its own positions)
            click.echo(f"server {index}:")
        for p in PartitionManager(url).partitions():
            click.echo(
                f"{p.table_name}  [{p.lower_bound}, {p.upper_bound})  {p.state}"
                + (f"  -> {p.archived_to}" if p.archived_to else "")
            )


@partitions.command("retire")
@gcs_url_option
@click.argument("table_name")
@click.option(
    "--archive",
    "archive_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Export the partition to Parquet in this directory before dropping it.",
)
@click.option(
    "--server",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="On a log on several servers: the server (as `cairn partitions list` numbers them).",
)
def partitions_retire(
    gcs_url: str | None, table_name: str, archive_dir: Path | None, server: int
) -> None:
    """Detach (concurrently), optionally export to Parquet, and drop one partition."""
    from controlplane.eventlog.partitions import PartitionManager

    urls = _log_owner_urls(gcs_url)
    if server >= len(urls):
        raise click.BadParameter(f"the log has {len(urls)} server(s)", param_hint="--server")
    path = PartitionManager(urls[server]).retire(table_name, archive_dir)
    click.echo(f"retired {table_name}" + (f", archived to {path}" if path else ""))


def _running_cluster_url() -> str:
    """The runtime's GCS URL of this machine's running cluster (asked of its head's
    node)."""
    with _head_client() as (client, _session_dir):
        return client.welcome.gcs_url


@contextlib.contextmanager
def _head_client() -> Iterator[tuple[CoreClient, Path]]:
    """A connection to this machine's running head node (as an observer), and its
    session directory; a clear error if none runs."""
    from controlplane import node_records
    from dataplane.client import CoreClient

    try:
        session_dir = node_records.find_running()
        client = CoreClient(str(session_dir / node_records.NODE_SOCKET), "observer")
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield client, session_dir
    finally:
        client.close()


@main.command()
@click.argument("statement")
@gcs_url_option
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@click.option(
    "--param",
    "params",
    multiple=True,
    help="A value for $1, $2, ... in order (text); repeat for each.",
)
@without_server_option
def sql(
    statement: str,
    gcs_url: str | None,
    output: str,
    params: tuple[str, ...],
    without: tuple[int, ...],
) -> None:
    """Run one read-only SQL statement against the log (the running cluster's, or
    --gcs-url) and print its rows. Writes are refused. docs/sql.md documents the
    views and has worked examples."""
    import asyncio

    from controlplane.readonly_sql import run_readonly
    from controlplane.sql_output import render

    url = resolve_gcs_url(gcs_url) or _running_cluster_url()
    with reading_the_log(without, failed="the statement failed: "):
        columns, rows = asyncio.run(run_readonly(url, statement, params, without=without))
    click.echo(render(columns, rows, output), nl=False)


@main.command()
@gcs_url_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8265, show_default=True, help="0: any free port.")
def dashboard(gcs_url: str | None, host: str, port: int) -> None:
    """Serve the dashboard (and the jobs' and metrics' HTTP API) for the log at
    --gcs-url (or the running cluster's), reading nothing but the log: it works after
    the cluster is gone. From other machines, calls carry $CAIRN_AUTH_TOKEN."""
    import asyncio
    import os

    from controlplane import auth
    from controlplane.web.__main__ import serve
    from controlplane.web.app import WebContext

    url = resolve_gcs_url(gcs_url) or _running_cluster_url()
    token = os.environ.get(auth.TOKEN_ENV) or None
    if token is None and not auth.is_loopback(host):
        raise click.UsageError(
            f"--host {host} is reachable from other machines: set {auth.TOKEN_ENV} to the "
            "token its callers must give"
        )
    asyncio.run(serve(WebContext(url, token, None), host, port))


@main.command()
@click.argument("object_id")
@gcs_url_option
@click.option("--json", "as_json", is_flag=True, help="Print the tree as JSON.")
@without_server_option
def lineage(object_id: str, gcs_url: str | None, as_json: bool, without: tuple[int, ...]) -> None:
    """Show the lineage of an object: the task that made it (function, node, time),
    its argument objects, the tasks that made them, and so on, from the log."""
    import asyncio
    import json

    from controlplane.lineage_tree import object_lineage, render_tree

    url = resolve_gcs_url(gcs_url) or _running_cluster_url()
    with reading_the_log(without):
        tree = asyncio.run(object_lineage(url, object_id, without=without))
    if tree is None:
        raise click.BadParameter(f"no object {object_id!r} in the log", param_hint="OBJECT_ID")
    click.echo(json.dumps(tree, indent=2, default=str) if as_json else render_tree(tree))


@main.command()
@click.option("--at", "at", required=True, help="A log position (integer) or an ISO 8601 time.")
@gcs_url_option
@click.option("--json", "as_json", is_flag=True, help="Print every entity, all tasks too, as JSON.")
@without_server_option
def state(at: str, gcs_url: str | None, as_json: bool, without: tuple[int, ...]) -> None:
    """Show jobs, tasks, actors and nodes as they were at a point of the log (a position,
    or the last position recorded by a time), from the log alone."""
    import json

    from controlplane.state_at import OutOfRangeError, parse_point, render, state_at

    try:
        point = parse_point(at)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--at") from None
    url = resolve_gcs_url(gcs_url) or _running_cluster_url()
    position, timestamp = (point, None) if isinstance(point, int) else (None, point)
    try:
        with reading_the_log(without):
            result = state_at(
                url, position=position, timestamp=timestamp, all_tasks=as_json, without=without
            )
    except OutOfRangeError as exc:
        raise click.BadParameter(str(exc), param_hint="--at") from None
    click.echo(json.dumps(result, indent=2, default=str) if as_json else render(result))


@main.command()
@click.argument("job_id")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the trace (JSON).",
)
@gcs_url_option
@without_server_option
def timeline(job_id: str, output: Path, gcs_url: str | None, without: tuple[int, ...]) -> None:
    """Write a job's task execution as a Chrome trace (chrome://tracing, Perfetto): one
    span per task attempt, per node and worker, from the log. A job's events lie on one
    server of a log on several: read without another that does not answer, its trace
    is whole."""
    import asyncio

    from controlplane.timeline import UnknownJobError, job_trace

    url = resolve_gcs_url(gcs_url) or _running_cluster_url()
    try:
        with reading_the_log(without):
            trace = asyncio.run(job_trace(url, job_id, without=without))
    except UnknownJobError as exc:
        raise click.BadParameter(str(exc), param_hint="JOB_ID") from None
    output.write_text(json.dumps(trace, default=str))
    spans = trace["otherData"]["task_attempts"]
    click.echo(f"wrote {spans} task attempts of job {job_id} to {output}")


def _duration(text: str) -> float:
    from controlplane.retention import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.option(
    "--older-than",
    required=True,
    help="Retire partitions whose newest event is older than this (30s, 15m, 12h, 7d).",
)
@click.option(
    "--archive",
    "archive_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Export each partition to Parquet in this directory before dropping it.",
)
@click.option("--dry-run", is_flag=True, help="Only say which partitions would go.")
@gcs_url_option
def gc(older_than: str, archive_dir: Path | None, dry_run: bool, gcs_url: str | None) -> None:
    """Retire whole partitions of the log older than --older-than: detach (without
    blocking appends), archive to Parquet with --archive, drop. The partition taking
    appends is never touched."""
    import asyncio

    from controlplane import retention

    seconds = _duration(older_than)
    urls = _log_owner_urls(gcs_url)
    retired: list[retention.Retired] = []
    for index, url in enumerate(urls):
        server = f"server {index}: " if len(urls) > 1 else ""  # (each its own partitions)
        full = asyncio.run(retention.full_partitions(url, seconds))
        expired = retention.unfinished(url) + [p for p in full if p.expired]
        if not expired:
            click.echo(
                f"{server}nothing to retire: no full partition's newest event is older "
                f"than {older_than}"
            )
            continue
        if dry_run:
            for part in expired:
                span = f"[{part.lower_bound}, {part.upper_bound})"
                click.echo(f"{server}would retire {part.table_name} {span}")
            continue
        into = archive_dir / f"server-{index}" if archive_dir and len(urls) > 1 else archive_dir

        def report(done: retention.Retired, server: str = server) -> None:
            click.echo(server + retention.describe(done))

        retired += retention.collect(url, expired, into, report)
    if not retired:
        return
    events = sum(r.partition.events for r in retired)
    if archive_dir is None:
        click.echo(
            f"{len(retired)} partitions, {events} events dropped without an archive "
            "(pass --archive DIR to keep them as Parquet)"
        )
    else:
        click.echo(f"{len(retired)} partitions, {events} events archived in {archive_dir}")


def _log_owner_urls(gcs_url: str | None) -> list[str]:
    """Every server of the log, as its owner (maintenance is DDL): the URL given (or
    ``$CAIRN_GCS_URL``) and the others with its login (a log on servers given by URL
    has one login on all), else this machine's running cluster's, each embedded server
    with the owner's login kept in its own session directory where this user may read
    it (dropping partitions is DDL, which the runtime role may not do)."""
    from controlplane.embedded_postgres import owner_url
    from controlplane.gcs import LOG_SERVER_DIR
    from controlplane.log_servers import server_urls

    given = resolve_gcs_url(gcs_url)
    if given is not None:
        return server_urls(given)
    with _head_client() as (client, session_dir):
        url = client.welcome.gcs_url
    return [
        owner_url(server, session_dir / LOG_SERVER_DIR.format(index) if index else session_dir)
        or server
        for index, server in enumerate(server_urls(url))
    ]


@main.command()
@click.argument("job_id")
@click.option("--task", "task_id", default=None, help="Replay only this task and its upstream.")
@click.option("--address", default=None, help="The cluster to run on (default: this machine's).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the run.")
@gcs_url_option
@without_server_option
def replay(
    job_id: str,
    task_id: str | None,
    address: str | None,
    timeout: float,
    gcs_url: str | None,
    without: tuple[int, ...],
) -> None:
    """Re-run a recorded job (or one task and its upstream) from the log on the running
    cluster, and report the first task whose output differs from the recorded one.
    Exits 0 when every task matched, 1 at a divergence."""
    from controlplane import node_records
    from controlplane.replay import ReplayError, UnknownIdError, replay

    url = resolve_gcs_url(gcs_url) or _running_cluster_url()

    def socket_path() -> str:
        try:
            return str(node_records.find_running(address) / node_records.NODE_SOCKET)
        except ConnectionError as exc:
            raise click.ClickException(str(exc)) from exc

    with click.progressbar(length=1, label="replaying", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)

        try:
            with reading_the_log(without):
                report = replay(
                    url,
                    socket_path,
                    job_id,
                    task_id=task_id,
                    timeout=timeout,
                    progress=progress,
                    without=without,
                )
        except UnknownIdError as exc:
            raise click.BadParameter(str(exc), param_hint="JOB_ID or --task") from None
        except ReplayError as exc:
            raise click.ClickException(str(exc)) from None
    for note in dict.fromkeys(report.notes):
        click.echo(f"note: {note}", err=True)
    compared = len(report.comparisons)
    click.echo(f"replayed job {job_id} as job {report.replay_job_id}: {compared} tasks compared")
    divergence = report.first_divergence
    if divergence is None:
        click.echo(f"every task gave the recorded output ({compared} identical)")
        return
    old, new = divergence.original, divergence.replayed
    click.echo(f"first divergence: task {old.spec.task_id} ({old.spec.name})")
    click.echo(f"  recorded: {old.outcome} {old.digest or old.error or ''}".rstrip())
    if new is None:
        click.echo("  replayed: not run again (its parent did not submit it)")
    else:
        click.echo(
            f"  replayed: {new.outcome} {new.digest or new.error or ''} (task {new.spec.task_id})"
        )
    sys.exit(1)


@main.command()
@click.option("--units", type=click.Choice(["B", "KB", "MB", "GB"]), default="B")
@click.option("--stats-only", is_flag=True, help="Only the totals.")
@click.option("--num-entries", type=int, default=None, help="At most this many objects.")
def memory(units: str, stats_only: bool, num_entries: int | None) -> None:
    """Show the object stores of the cluster of this machine's head: each node's
    objects (state, size, holders, pins) and totals, as Ray's `ray memory`."""
    from dataplane import memory_summary

    with _head_client() as (client, _session_dir):
        answer = memory_summary.ask(client)
    click.echo(
        memory_summary.format_summary(
            answer, units=units, stats_only=stats_only, num_entries=num_entries
        )
    )


@main.command()
def metrics() -> None:
    """Print the metrics of the cluster of this machine's head (or node), every live
    node's, in Prometheus' text format: what the head serves at /metrics."""
    import asyncio

    from controlplane import auth, tls
    from controlplane.web.metrics import exposition

    with _head_client() as (client, session_dir):
        url = client.welcome.gcs_url
    body = asyncio.run(exposition(url, auth.read_token(session_dir), tls.NodeTls.find(session_dir)))
    click.echo(body.decode(), nl=False)


@main.command()
def status() -> None:
    """Show the cluster: its nodes, their resources and use, pending work."""
    import asyncio

    import asyncpg

    from controlplane.membership import cluster_nodes, infeasible_tasks

    url = _running_cluster_url()
    nodes = asyncio.run(cluster_nodes(url))
    unknown = ""
    try:
        infeasible = asyncio.run(infeasible_tasks(url))
    except asyncpg.PostgresError as exc:  # (08: a server of the log does not answer)
        if not str(exc.sqlstate).startswith("08"):
            raise
        infeasible, unknown = [], " ".join(str(exc).split())
    alive = [n for n in nodes if n["state"] == "ALIVE"]
    click.echo(f"GCS {redact(url)}; {len(alive)} nodes alive, {len(nodes) - len(alive)} dead")
    for node in nodes:
        total, available = node["resources"] or {}, node["available"] or {}
        head = " (head)" if node.get("head") else ""
        click.echo(f"node {node['node_id']} {node['state']} at {node['address']}{head}")
        if node["state"] != "ALIVE":
            click.echo(f"  {node['death_cause']}")
            continue
        for name, amount in sorted(total.items()):
            if name == "object_store_memory":
                continue
            used = amount - available.get(name, amount)
            click.echo(f"  {name:<12} {used:g}/{amount:g} used")
        load = node["load"] or {}
        if load:
            click.echo(
                f"  object store {load['object_store_used']:,}/"
                f"{int(total.get('object_store_memory', 0)):,} bytes used; workers "
                f"{load['workers']}; tasks: {load['running_tasks']} running, "
                f"{load['pending_tasks']} queued, {load['waiting_tasks']} waiting for "
                f"arguments; actors: {load['actors']}"
            )
    if infeasible:
        click.echo(f"{len(infeasible)} infeasible tasks or actors (no node can run them):")
        for kind, entity_id, resources in infeasible[:20]:
            click.echo(f"  {kind} {entity_id} needs {resources}")
    if unknown:
        click.echo(f"infeasible tasks and actors unknown: the log's union says {unknown}")


def run() -> None:
    try:
        main(standalone_mode=True)
    except GcsError as exc:
        click.echo(f"cairn: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
