"""Options shared by the ``cairn`` commands."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

from controlplane.gcs_url import ENV_VAR, resolve_gcs_url

gcs_url_option = click.option(
    "--gcs-url",
    envvar=ENV_VAR,
    default=None,
    help=f"PostgreSQL URL of the log (default: ${ENV_VAR}).",
)


without_server_option = click.option(
    "--without-server",
    "without",
    type=int,
    multiple=True,
    help="Leave out server K of a log on several (one that does not answer): the answer "
    "lacks the events of the jobs whose shards it holds. Repeat for each.",
)


def server_away_error(exc: BaseException) -> click.ClickException | None:
    """What to say when a read of the whole log failed because one of its servers does
    not answer (``exc`` or its cause): which one, and how to read the others."""
    from controlplane.log_servers import server_not_answering

    away = server_not_answering(exc)
    if away is None and exc.__cause__ is not None:
        away = server_not_answering(exc.__cause__)
    if away is None:
        return None
    said = " ".join(str(exc.__cause__ or exc).split())
    return click.ClickException(
        f"server {away} of the log does not answer ({said}); --without-server {away} "
        "answers from the others, without the events of the jobs whose shards it holds"
    )


def say_left_out(without: tuple[int, ...]) -> None:
    """Says on stderr what an answer read without some servers lacks."""
    if without:
        left_out = ", ".join(str(k) for k in sorted(set(without)))
        click.echo(
            f"(without server(s) {left_out} of the log: the events of the jobs whose shards "
            "they hold are not in this answer)",
            err=True,
        )


@contextlib.contextmanager
def reading_the_log(without: tuple[int, ...], failed: str = "") -> Iterator[None]:
    """Around a command's read of the whole log: a PostgreSQL error becomes the
    command's error (``failed`` before its text), naming a server that does not answer
    and the way on; a read without some servers says what its answer lacks."""
    import asyncpg

    try:
        yield
    except asyncpg.PostgresError as exc:
        raise server_away_error(exc) or click.ClickException(f"{failed}{exc}") from None
    say_left_out(without)


def require_url(url: str | None) -> str:
    resolved = resolve_gcs_url(url)
    if resolved is None:
        raise click.UsageError(f"no GCS: pass --gcs-url or set {ENV_VAR}")
    return resolved
