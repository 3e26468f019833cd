"""The ``cairn`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from controlplane.errors import GcsError
from controlplane.gcs_url import ENV_VAR, resolve_gcs_url

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


def run() -> None:
    try:
        main(standalone_mode=True)
    except GcsError as exc:
        click.echo(f"cairn: {exc}", err=True)
        sys.exit(1)
