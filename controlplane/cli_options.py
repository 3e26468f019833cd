"""Options shared by the ``cairn`` commands."""

from __future__ import annotations

import click

from controlplane.gcs_url import ENV_VAR, resolve_gcs_url

gcs_url_option = click.option(
    "--gcs-url",
    envvar=ENV_VAR,
    default=None,
    help=f"PostgreSQL URL of the log (default: ${ENV_VAR}).",
)


def require_url(url: str | None) -> str:
    resolved = resolve_gcs_url(url)
    if resolved is None:
        raise click.UsageError(f"no GCS: pass --gcs-url or set {ENV_VAR}")
    return resolved
