"""``cairn logs``: what a task, actor, worker or job printed, or a node's log files, from
any machine of the cluster (controlplane/logs.py finds and reads them). Options named
as Ray's ``ray logs``: ``--follow``, ``--tail``, ``--err``, ``--attempt-number``,
``--interval``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import click

from controlplane import logs
from controlplane.cli_options import gcs_url_option
from controlplane.cli_state import _url

T = TypeVar("T")
_BY = ("task", "actor", "worker", "node", "job")


@click.command("logs")
@click.option("--task", "task_id", help="One attempt's lines of this task.")
@click.option("--actor", "actor_id", help="All of this actor's output, every restart's.")
@click.option("--worker", "worker_id", help="All of this worker's output.")
@click.option("--node", "node_id", help="This node's log files (with --file: one of them).")
@click.option("--job", "job_id", help="The lines of every task and actor of this job.")
@click.option("--file", "file_name", help="With --node: the file to print.")
@click.option(
    "--attempt-number",
    type=int,
    default=0,
    show_default=True,
    help="With --task: which attempt (0: the first run; -1: the last).",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C to stop).")
@click.option(
    "-t", "--tail", type=int, default=-1, show_default=True, help="The last N lines (-1: all)."
)
@click.option("--err", is_flag=True, help="Stderr instead of stdout.")
@click.option(
    "--interval",
    type=float,
    default=logs.FOLLOW_INTERVAL_S,
    show_default=True,
    help="With --follow: seconds between looks for new lines.",
)
@click.option("--address", default=None, help="The cluster's head (HOST:PORT); default: here.")
@gcs_url_option
def logs_command(
    task_id: str | None,
    actor_id: str | None,
    worker_id: str | None,
    node_id: str | None,
    job_id: str | None,
    file_name: str | None,
    attempt_number: int,
    follow: bool,
    tail: int,
    err: bool,
    interval: float,
    address: str | None,
    gcs_url: str | None,
) -> None:
    """Print what a task, actor, worker or job printed (--task/--actor/--worker/--job ID),
    or list a node's log files (--node ID; --file NAME prints one), from any machine of
    the cluster, also after the worker died."""
    given = (task_id, actor_id, worker_id, node_id, job_id)
    chosen = [n for n, v in zip(_BY, given, strict=True) if v]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --task, --actor, --worker, --node, --job")
    if file_name is not None and node_id is None:
        raise click.UsageError("--file names a file of a node: give --node too")
    if attempt_number != 0 and task_id is None:
        raise click.UsageError("--attempt-number is for --task")
    if node_id is not None and file_name is None and (follow or err or tail != -1):
        raise click.UsageError("--follow, --tail and --err read a file: give --file NAME")
    if interval <= 0:
        raise click.BadParameter("must be positive", param_hint="--interval")
    reader = logs.LogReader(_url(gcs_url, address))
    suffix = "err" if err else "out"
    if node_id is not None and file_name is None:
        for entry in _run(reader.node_files(node_id)):
            click.echo(f"{entry['size']:>12,}  {entry['name']}")
        return
    fetch: Callable[[], Coroutine[Any, Any, logs.Lines]]
    if task_id is not None:
        fetch = lambda: reader.task_lines(task_id, attempt_number, suffix)  # noqa: E731
    elif actor_id is not None:
        fetch = lambda: reader.actor_lines(actor_id, suffix)  # noqa: E731
    elif worker_id is not None:
        fetch = lambda: reader.worker_lines(worker_id, suffix)  # noqa: E731
    elif job_id is not None:
        fetch = lambda: reader.job_lines(job_id, suffix)  # noqa: E731
    else:
        assert node_id is not None and file_name is not None
        fetch = lambda: reader.file_lines(node_id, file_name)  # noqa: E731
    if not follow:
        found = _run(fetch())
        _notes(found.notes)
        for line in logs.tail(found.lines, tail):
            click.echo(line)
        return
    ended: Callable[[], Awaitable[bool]] | None = None
    if task_id is not None:  # (one not started yet is waited for)
        fetch = lambda: reader.task_lines_once_started(task_id, attempt_number, suffix)  # noqa: E731
        ended = lambda: reader.task_ended(task_id, attempt_number)  # noqa: E731
    with contextlib.suppress(KeyboardInterrupt):
        _run(_print_following(fetch, ended, tail, interval))


async def _print_following(
    fetch: Callable[[], Awaitable[logs.Lines]],
    ended: Callable[[], Awaitable[bool]] | None,
    tail: int,
    interval: float,
) -> None:
    async for line in logs.follow(fetch, ended, tail, interval, lambda n: _notes([n])):
        click.echo(line)


def _notes(notes: list[str]) -> None:
    for note in notes:
        click.echo(f"cairn logs: {note}", err=True)


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coroutine)
    except logs.LogsError as exc:
        raise click.ClickException(str(exc)) from None
