"""The ``cairn`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from controlplane.errors import GcsError
from controlplane.gcs_url import ENV_VAR, redact, resolve_gcs_url

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
@click.option("--address", default=None, help="Join the cluster at HOST:PORT (not available yet).")
@_gcs_url_option
@click.option("--num-cpus", type=float, default=None, help="CPUs of this node (default: all).")
@click.option("--num-gpus", type=float, default=None, help="GPUs of this node.")
@click.option("--resources", default=None, help="Custom resources, as JSON: '{\"disk\": 2}'.")
@click.option("--object-store-memory", type=int, default=None, help="Store size in bytes.")
@click.option("--block", is_flag=True, help="Stay in the foreground until the node stops.")
@click.option("--node-config", default=None, hidden=True)  # from start_head_in_background
def start(
    head: bool,
    address: str | None,
    gcs_url: str | None,
    num_cpus: float | None,
    num_gpus: float | None,
    resources: str | None,
    object_store_memory: int | None,
    block: bool,
    node_config: str | None,
) -> None:
    """Start a node of a cluster that outlives its drivers (init(address="auto"))."""
    from controlplane import head as head_node

    if address is not None:
        raise click.UsageError(
            "joining a cluster over the network (--address) is not available yet; "
            "start a single-node cluster with --head"
        )
    if not head:
        raise click.UsageError("pass --head (joining with --address is not available yet)")
    try:
        custom = json.loads(resources) if resources else None
        if custom is not None and not isinstance(custom, dict):
            raise ValueError(f"--resources must be a JSON object, got {resources!r}")
        config = (
            head_node.NodeConfig(**json.loads(node_config))
            if node_config
            else head_node.node_config(num_cpus, num_gpus, custom, object_store_memory)
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    running = head_node.read_current()
    if running is not None and head_node.is_running(*running):
        raise click.ClickException(
            f"a cluster is already running here (head pid {running[1]}, {running[0]}): "
            "`cairn stop` it first"
        )
    if block:
        head_node.run_head(gcs_url, config, announce=click.echo)
        return
    session_dir = head_node.start_head_in_background(gcs_url, config)
    click.echo(
        f"Started a Cairn head node (session {session_dir}).\n"
        'Connect drivers with sdk.init(address="auto"); `cairn status` shows the cluster, '
        "`cairn stop` stops it."
    )


@main.command()
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait per process.")
def stop(timeout: float) -> None:
    """Stop this machine's running cluster (its head process and everything it started)."""
    from controlplane import head as head_node

    click.echo(head_node.stop_current(timeout))


@main.command()
def status() -> None:
    """Show the running cluster: nodes, their resources and use, pending work."""
    from controlplane import head as head_node
    from dataplane.client import CoreClient

    try:
        session_dir = head_node.find_running()
        client = CoreClient(str(session_dir / head_node.NODE_SOCKET), "observer")
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        info = client.cluster_info()
    finally:
        client.close()
    click.echo(f"session {session_dir}, GCS {redact(client.welcome.gcs_url)}")
    click.echo(f"node {info['node_id']} (head)")
    for name, total in sorted(info["total"].items()):
        if name == "object_store_memory":
            continue
        used = total - info["available"].get(name, 0.0)
        click.echo(f"  {name:<12} {used:g}/{total:g} used")
    click.echo(
        f"  object store {info['object_store_used']:,}/{info['object_store_capacity']:,} "
        f"bytes used, {info['objects']} objects"
    )
    click.echo(
        f"  workers {info['workers']}; tasks: {info['running_tasks']} running, "
        f"{info['pending_tasks']} queued, {info['waiting_tasks']} waiting for arguments; "
        f"actors: {info['actors']} alive or restarting, {info['pending_actors']} pending"
    )


def run() -> None:
    try:
        main(standalone_mode=True)
    except GcsError as exc:
        click.echo(f"cairn: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
