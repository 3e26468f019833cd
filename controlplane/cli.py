"""The ``cairn`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from controlplane.local_node import JoinedTls

from controlplane import auth, tls
from controlplane.errors import GcsError
from controlplane.gcs_url import ENV_VAR, redact, resolve_gcs_url
from controlplane.node import rpc

_gcs_url_option = click.option(
    "--gcs-url",
    envvar=ENV_VAR,
    default=None,
    help=f"PostgreSQL URL of the log (default: ${ENV_VAR}).",
)


def _require_url(url: str | None) -> str:
    resolved = resolve_gcs_url(url)
    if resolved is None:
        raise click.UsageError(f"no GCS: pass --gcs-url or set {ENV_VAR}")
    return resolved


@click.group()
def main() -> None:
    """Cairn: Ray's programming model on an event-sourced PostgreSQL log."""


@main.command()
@_gcs_url_option
@click.option("--writers", default=4, show_default=True, help="Writer processes.")
@click.option("--tasks", default=2500, show_default=True, help="Tasks per writer.")
def demo(gcs_url: str | None, writers: int, tasks: int) -> None:
    """Append and tail a real workload of task events; print what was measured."""
    from controlplane.demo import run_demo

    run_demo(gcs_url, writers=writers, tasks_per_writer=tasks)


@main.command()
@_gcs_url_option
@click.option("--revision", default="head", show_default=True)
def migrate(gcs_url: str | None, revision: str) -> None:
    """Bring the log's schema up to a revision."""
    from controlplane import schema
    from controlplane.gcs import check_reachable

    url = _require_url(gcs_url)
    check_reachable(url)
    schema.upgrade(url, revision)
    click.echo(f"schema at {revision}")


@main.group()
def partitions() -> None:
    """Manage the log's partitions."""


@partitions.command("list")
@_gcs_url_option
def partitions_list(gcs_url: str | None) -> None:
    """Show every partition with its position range and state."""
    from controlplane.eventlog.partitions import PartitionManager

    for p in PartitionManager(_require_url(gcs_url)).partitions():
        click.echo(
            f"{p.table_name}  [{p.lower_bound}, {p.upper_bound})  {p.state}"
            + (f"  -> {p.archived_to}" if p.archived_to else "")
        )


@partitions.command("retire")
@_gcs_url_option
@click.argument("table_name")
@click.option(
    "--archive",
    "archive_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Export the partition to Parquet in this directory before dropping it.",
)
def partitions_retire(gcs_url: str | None, table_name: str, archive_dir: Path | None) -> None:
    """Detach (concurrently), optionally export to Parquet, and drop one partition."""
    from controlplane.eventlog.partitions import PartitionManager

    path = PartitionManager(_require_url(gcs_url)).retire(table_name, archive_dir)
    click.echo(f"retired {table_name}" + (f", archived to {path}" if path else ""))


@main.command()
@click.option("--head", is_flag=True, help="Start a head node (the GCS and a node daemon).")
@click.option("--address", default=None, help="Join the cluster whose head is at HOST:PORT.")
@click.option(
    "--port",
    type=int,
    default=None,
    help=f"Port of the node's gRPC service (head: {rpc.DEFAULT_HEAD_PORT}; node: any free).",
)
@click.option(
    "--node-ip-address",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (loopback unless given).",
)
@_gcs_url_option
@click.option("--num-cpus", type=float, default=None, help="CPUs of this node (default: all).")
@click.option("--num-gpus", type=float, default=None, help="GPUs of this node.")
@click.option("--resources", default=None, help="Custom resources, as JSON: '{\"disk\": 2}'.")
@click.option("--object-store-memory", type=int, default=None, help="Store size in bytes.")
@click.option("--block", is_flag=True, help="Stay in the foreground until the node stops.")
@click.option(
    "--disable-auth",
    is_flag=True,
    help="Serve gRPC without the cluster token: loopback-only development, never more.",
)
@click.option(
    "--tls",
    "tls_mode",
    type=click.Choice(tls.MODES),
    default="auto",
    show_default=True,
    help="TLS on every link between machines (gRPC and PostgreSQL); auto: on when the "
    "cluster has an address that is not loopback. 'off' sends everything in clear text.",
)
@click.option(
    "--gcs-replicas",
    type=int,
    default=0,
    show_default=True,
    help="Head only: synchronous replicas of the embedded GCS (0 or 1), on this machine "
    "unless --gcs-replica-host names another; a watchdog promotes the replica when the "
    "primary is gone, and every process follows.",
)
@click.option(
    "--gcs-replica-host",
    default=None,
    help="Head only, with --gcs-replicas 1: run the replica on that machine instead of "
    "this one (start a node there with --gcs-replica), so that the cluster outlives "
    "this machine.",
)
@click.option(
    "--gcs-replica",
    "run_gcs_replica",
    is_flag=True,
    help="Joining node only: run the head's GCS replica on this machine (the head was "
    "started with --gcs-replica-host and this machine's address).",
)
@click.option("--node-config", default=None, hidden=True)  # from start_in_background
def start(
    head: bool,
    address: str | None,
    port: int | None,
    node_ip_address: str,
    gcs_url: str | None,
    num_cpus: float | None,
    num_gpus: float | None,
    resources: str | None,
    object_store_memory: int | None,
    block: bool,
    disable_auth: bool,
    tls_mode: str,
    gcs_replicas: int,
    gcs_replica_host: str | None,
    run_gcs_replica: bool,
    node_config: str | None,
) -> None:
    """Start a node: a head (--head) or one that joins a head (--address HOST:PORT).
    Every gRPC call between nodes carries the cluster token: the head draws it (or takes
    $CAIRN_AUTH_TOKEN), a joining node reads $CAIRN_AUTH_TOKEN or, on the head's
    machine, the head's session directory."""
    from controlplane import local_node

    if head == (address is not None):
        raise click.UsageError("pass either --head or --address HOST:PORT")
    if gcs_replicas and not head:
        raise click.UsageError("--gcs-replicas is for the head (it runs the GCS)")
    if gcs_replica_host is not None and not (head and gcs_replicas):
        raise click.UsageError("--gcs-replica-host is for a head with --gcs-replicas 1")
    if run_gcs_replica and head:
        raise click.UsageError(
            "--gcs-replica is for a node that joins (--address): the head runs the primary"
        )
    try:
        from controlplane.gcs import check_replicas

        check_replicas(gcs_replicas, external=head and resolve_gcs_url(gcs_url) is not None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gcs-replicas") from None
    if disable_auth:
        if not auth.is_loopback(node_ip_address):
            raise click.UsageError(
                f"--disable-auth is for loopback-only development: it cannot be combined "
                f"with --node-ip-address {node_ip_address}"
            )
        click.echo(
            "WARNING: authentication is DISABLED (--disable-auth): any process on this "
            "machine can call this node and run code on the cluster. Development only.",
            err=True,
        )
    try:
        cluster_hosts = [node_ip_address, *([rpc.split_address(address)[0]] if address else [])]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--address") from None
    use_tls = tls.wanted(tls_mode, *cluster_hosts)
    if (gcs_replica_host or run_gcs_replica) and not use_tls:
        raise click.UsageError(
            "a GCS replica on another machine needs TLS between machines: give addresses "
            "that are not loopback, and not --tls off"
        )
    if use_tls and disable_auth:
        raise click.UsageError(
            "TLS needs the cluster token (it is derived from it to join): drop --disable-auth"
        )
    if tls_mode == "off" and not all(auth.is_loopback(h) for h in cluster_hosts):
        click.echo(
            "WARNING: TLS is OFF (--tls off): the cluster token, the GCS password, task code, "
            "arguments and objects cross the network in clear text.",
            err=True,
        )
    drawn = head and not disable_auth and not os.environ.get(auth.TOKEN_ENV)
    token = None if disable_auth else os.environ.get(auth.TOKEN_ENV) or None
    if drawn:  # a background start hands it to its --block process in the environment
        token = auth.new_token()
    try:
        custom = json.loads(resources) if resources else None
        if custom is not None and not isinstance(custom, dict):
            raise ValueError(f"--resources must be a JSON object, got {resources!r}")
        config = (
            local_node.NodeConfig(**json.loads(node_config))
            if node_config
            else local_node.node_config(num_cpus, num_gpus, custom, object_store_memory)
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    replica_plan = None
    if head:
        running = local_node.running_head()
        if running is not None:
            raise click.ClickException(
                f"a cluster is already running here (head pid {running.pid}, at "
                f"{running.address}): `cairn stop` it first"
            )
        port = rpc.DEFAULT_HEAD_PORT if port is None else port
    else:
        assert address is not None
        token = None if disable_auth else auth.find_token(address)
        joined, joined_tls = _join(address, token, node_ip_address, use_tls, run_gcs_replica)
        if joined.get("auth", True) != (not disable_auth):
            raise click.ClickException(
                f"the head at {address} runs with authentication "
                f"{'on' if joined.get('auth', True) else 'off (--disable-auth)'}: join it "
                f"{'without' if disable_auth else 'with'} --disable-auth, as the head"
            )
        gcs_url = joined["gcs_url"]
        port = 0 if port is None else port
        if run_gcs_replica:
            from controlplane.gcs_replica import ReplicaPlan

            if "gcs_replica" not in joined:
                why = joined.get("gcs_replica_refused", "it does not know of GCS replicas")
                raise click.ClickException(f"the head at {address} refused: {why}")
            replica_plan = ReplicaPlan.from_dict(joined["gcs_replica"])
    role = local_node.ClusterRole(
        head=head,
        rpc_port=port,
        rpc_host=node_ip_address,
        auth_token=token,
        tls=use_tls,
        joined_tls=None if head else joined_tls,
        gcs_replica_host=gcs_replica_host,
        gcs_replica=replica_plan,
    )
    if drawn and block:
        click.echo(_token_notice(token))
    if block:
        local_node.run_node(
            gcs_url, config, role, announce=click.echo, cluster=address, gcs_replicas=gcs_replicas
        )
        return
    try:
        node = local_node.start_in_background(gcs_url, config, role, address, gcs_replicas)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    if head:
        if drawn:
            click.echo(_token_notice(token))
        click.echo(
            f"Started a Cairn head node at {node.address} (session {node.session_dir}; "
            f"output in {local_node.node_log(node.pid)}).\n"
            f"Join nodes with `cairn start --address {node.address}`; connect drivers "
            'with sdk.init(address="auto"); `cairn status` shows the cluster, `cairn stop` '
            "stops this machine's nodes."
            + (
                "\nThe GCS has a synchronous replica; a watchdog promotes it if the primary "
                "is lost (once)."
                if gcs_replicas
                else ""
            )
        )
    else:
        click.echo(
            f"Started a Cairn node at {node.address}, joined to {address} (output in "
            f"{local_node.node_log(node.pid)})."
        )


def _join(
    address: str, token: str | None, node_ip_address: str, use_tls: bool, gcs_replica: bool
) -> tuple[dict[str, Any], JoinedTls | None]:
    """Asks the head at ``address`` for what joining needs; with TLS, a certificate for
    a key made here (which never leaves this machine); with ``gcs_replica``, the plan
    of the GCS replica this machine is to run."""
    request: dict[str, Any] | None = None
    key = tls.new_key()
    if use_tls:
        hosts = [node_ip_address, "127.0.0.1", "localhost"]
        request = {"csr": tls.signing_request(key, "cairn node").decode(), "hosts": hosts}
        request |= {"gcs_replica": True} if gcs_replica else {}
    try:
        joined = rpc.join(address, token, request=request)
    except (ValueError, ConnectionError, rpc.AuthError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not use_tls:
        return joined, None
    if not joined.get("tls") or "cert" not in joined:
        raise click.ClickException(f"the head at {address} did not issue a TLS certificate")
    from controlplane.local_node import JoinedTls

    return joined, JoinedTls(
        joined["ca"].encode(),
        joined["cert"].encode(),
        tls.key_pem(key),
        gcs=bool(joined.get("gcs_tls")),
    )


def _token_notice(token: str | None) -> str:
    return (
        f"Cluster token (shown once; stored owner-only in the session directory as "
        f"{auth.TOKEN_FILE}): {token}\nOn other machines, set {auth.TOKEN_ENV} to it before "
        "`cairn start --address`."
    )


@main.command()
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait per node.")
def stop(timeout: float) -> None:
    """Stop every Cairn node this machine runs (worker nodes first, then the head)."""
    from controlplane import local_node

    for line in local_node.stop_local_nodes(timeout):
        click.echo(line)


def _running_cluster_url(*, owner: bool = False) -> str:
    """The GCS URL of this machine's running cluster (asked of its head's node): the
    runtime's, or with ``owner`` the schema owner's where the head runs an embedded
    server whose session directory this user may read (maintenance, such as dropping
    partitions, is DDL, which the runtime role may not do)."""
    from controlplane import node_records
    from controlplane.embedded_postgres import owner_url
    from dataplane.client import CoreClient

    try:
        session_dir = node_records.find_running()
        client = CoreClient(str(session_dir / node_records.NODE_SOCKET), "observer")
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        url = client.welcome.gcs_url
    finally:
        client.close()
    return (owner_url(url, session_dir) if owner else None) or url


@main.command()
@click.argument("statement")
@_gcs_url_option
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
def sql(statement: str, gcs_url: str | None, output: str, params: tuple[str, ...]) -> None:
    """Run one read-only SQL statement against the log (the running cluster's, or
    --gcs-url) and print its rows. Writes are refused. docs/sql.md documents the
    views and has worked examples."""
    import asyncio

    import asyncpg

    from controlplane.readonly_sql import run_readonly
    from controlplane.sql_output import render

    url = resolve_gcs_url(gcs_url) or _running_cluster_url()
    try:
        columns, rows = asyncio.run(run_readonly(url, statement, params))
    except asyncpg.PostgresError as exc:
        raise click.ClickException(f"the statement failed: {exc}") from None
    click.echo(render(columns, rows, output), nl=False)


@main.command()
@click.argument("object_id")
@_gcs_url_option
@click.option("--json", "as_json", is_flag=True, help="Print the tree as JSON.")
def lineage(object_id: str, gcs_url: str | None, as_json: bool) -> None:
    """Show the lineage of an object: the task that made it (function, node, time),
    its argument objects, the tasks that made them, and so on, from the log."""
    import asyncio
    import json

    from controlplane.lineage_tree import LINEAGE_QUERY, build, render_tree
    from controlplane.readonly_sql import run_readonly
    from controlplane.sql import queries

    url = resolve_gcs_url(gcs_url) or _running_cluster_url()
    known = asyncio.run(run_readonly(url, queries["object_known"], [object_id]))[1]
    if not known[0][0]:
        raise click.BadParameter(f"no object {object_id!r} in the log", param_hint="OBJECT_ID")
    columns, rows = asyncio.run(run_readonly(url, LINEAGE_QUERY, [object_id]))
    tree = build([dict(zip(columns, row, strict=True)) for row in rows], object_id)
    click.echo(json.dumps(tree, indent=2, default=str) if as_json else render_tree(tree))


@main.command()
@click.option("--at", "at", required=True, help="A log position (integer) or an ISO 8601 time.")
@_gcs_url_option
@click.option("--json", "as_json", is_flag=True, help="Print every entity, all tasks too, as JSON.")
def state(at: str, gcs_url: str | None, as_json: bool) -> None:
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
        result = state_at(url, position=position, timestamp=timestamp, all_tasks=as_json)
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
@_gcs_url_option
def timeline(job_id: str, output: Path, gcs_url: str | None) -> None:
    """Write a job's task execution as a Chrome trace (chrome://tracing, Perfetto): one
    span per task attempt, per node and worker, from the log."""
    import asyncio

    from controlplane.timeline import UnknownJobError, job_trace

    url = resolve_gcs_url(gcs_url) or _running_cluster_url()
    try:
        trace = asyncio.run(job_trace(url, job_id))
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
@_gcs_url_option
def gc(older_than: str, archive_dir: Path | None, dry_run: bool, gcs_url: str | None) -> None:
    """Retire whole partitions of the log older than --older-than: detach (without
    blocking appends), archive to Parquet with --archive, drop. The partition taking
    appends is never touched."""
    import asyncio

    from controlplane import retention

    seconds = _duration(older_than)
    url = resolve_gcs_url(gcs_url) or _running_cluster_url(owner=True)
    full = asyncio.run(retention.full_partitions(url, seconds))
    expired = retention.unfinished(url) + [p for p in full if p.expired]
    if not expired:
        click.echo(
            f"nothing to retire: no full partition's newest event is older than {older_than}"
        )
        return
    if dry_run:
        for part in expired:
            click.echo(f"would retire {part.table_name} [{part.lower_bound}, {part.upper_bound})")
        return
    retired = retention.collect(
        url, expired, archive_dir, lambda r: click.echo(retention.describe(r))
    )
    events = sum(r.partition.events for r in retired)
    if archive_dir is None:
        click.echo(
            f"{len(retired)} partitions, {events} events dropped without an archive "
            "(pass --archive DIR to keep them as Parquet)"
        )
    else:
        click.echo(f"{len(retired)} partitions, {events} events archived in {archive_dir}")


@main.command()
@click.argument("job_id")
@click.option("--task", "task_id", default=None, help="Replay only this task and its upstream.")
@click.option("--address", default=None, help="The cluster to run on (default: this machine's).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the run.")
@_gcs_url_option
def replay(
    job_id: str, task_id: str | None, address: str | None, timeout: float, gcs_url: str | None
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
            report = replay(
                url, socket_path, job_id, task_id=task_id, timeout=timeout, progress=progress
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
def status() -> None:
    """Show the cluster: its nodes, their resources and use, pending work."""
    import asyncio

    from controlplane.membership import cluster_nodes, infeasible_tasks

    url = _running_cluster_url()
    nodes = asyncio.run(cluster_nodes(url))
    infeasible = asyncio.run(infeasible_tasks(url))
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


def run() -> None:
    try:
        main(standalone_mode=True)
    except GcsError as exc:
        click.echo(f"cairn: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
