"""``cairn job``: Ray's Jobs CLI (``ray job submit/status/logs/stop/list/delete``) over
the head's HTTP service (controlplane/job_client.py). ``--address`` defaults to
``$RAY_ADDRESS`` / ``$CAIRN_ADDRESS`` when it is an http(s) URL, else to this machine's
head's service."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # (imported where used: every `cairn` command starts faster)
    from controlplane.job_client import JobSubmissionClient

_LINE = "-" * 54
_WAIT_POLL_S = 0.2

address_option = click.option(
    "--address",
    default=None,
    help="The head's HTTP service, http://HOST:8265 (default: $RAY_ADDRESS, "
    "$CAIRN_ADDRESS, or this machine's head).",
)


def _client(address: str | None) -> JobSubmissionClient:
    from controlplane.job_client import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def _json_option(value: str | None, name: str) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=name) from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param_hint=name)
    return parsed


def _calling(call: Any, *args: Any) -> Any:
    """Runs a client call; its errors become the command's error message."""
    try:
        return call(*args)
    except (RuntimeError, ConnectionError, ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def job() -> None:
    """Submit jobs to the cluster and follow them (Ray's Jobs CLI)."""


@job.command(context_settings={"ignore_unknown_options": True})
@address_option
@click.option("--submission-id", default=None, help="The job's id (default: a new one).")
@click.option("--job-id", default=None, hidden=True, help="Deprecated: --submission-id.")
@click.option("--runtime-env-json", default=None, help="The job's runtime_env, as JSON.")
@click.option("--metadata-json", default=None, help="Metadata to keep with the job, as JSON.")
@click.option("--working-dir", default=None, help="A local folder the job runs in (uploaded).")
@click.option("--entrypoint-num-cpus", type=float, default=None)
@click.option("--entrypoint-num-gpus", type=float, default=None)
@click.option("--entrypoint-memory", type=int, default=None)
@click.option("--entrypoint-resources", default=None, help="As JSON.")
@click.option("--no-wait", is_flag=True, help="Return once submitted; do not follow its output.")
@click.argument("entrypoint", nargs=-1, required=True, type=click.UNPROCESSED)
def submit(
    address: str | None,
    submission_id: str | None,
    job_id: str | None,
    runtime_env_json: str | None,
    metadata_json: str | None,
    working_dir: str | None,
    entrypoint_num_cpus: float | None,
    entrypoint_num_gpus: float | None,
    entrypoint_memory: int | None,
    entrypoint_resources: str | None,
    no_wait: bool,
    entrypoint: tuple[str, ...],
) -> None:
    """Submit a job: `cairn job submit -- python script.py`. Follows its output until it
    ends (exit code 0 if it succeeded, 1 if not) unless --no-wait."""
    client = _client(address)
    runtime_env = _json_option(runtime_env_json, "--runtime-env-json") or {}
    if working_dir is not None:
        runtime_env["working_dir"] = working_dir
    submission_id = _calling(
        lambda: client.submit_job(
            entrypoint=" ".join(entrypoint),
            submission_id=submission_id or job_id,
            runtime_env=runtime_env,
            metadata=_json_option(metadata_json, "--metadata-json"),
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
            entrypoint_memory=entrypoint_memory,
            entrypoint_resources=_json_option(entrypoint_resources, "--entrypoint-resources"),
        )
    )
    click.echo(f"Job submission server address: {client.get_address()}")
    click.echo(_LINE)
    click.echo(f"Job '{submission_id}' submitted successfully")
    click.echo(_LINE)
    if no_wait:
        click.echo(f"Query its status with `cairn job status {submission_id}`, its output")
        click.echo(f"with `cairn job logs {submission_id} --follow`.")
        return
    click.echo("Tailing logs until the job exits (disable with --no-wait):")
    _follow(client, submission_id)
    info = _calling(client.get_job_info, submission_id)
    click.echo(_LINE)
    from controlplane.jobs import JobStatus

    ended = {JobStatus.SUCCEEDED: "succeeded", JobStatus.STOPPED: "was stopped"}
    click.echo(f"Job '{submission_id}' {ended.get(info.status, 'failed')}")
    click.echo(_LINE)
    if info.status != JobStatus.SUCCEEDED:
        if info.message:
            click.echo(info.message, err=True)
        sys.exit(1)


def _follow(client: JobSubmissionClient, submission_id: str) -> None:
    async def follow() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            click.echo(chunk, nl=False)

    try:
        asyncio.run(follow())
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


@job.command()
@address_option
@click.argument("job_id")
def status(address: str | None, job_id: str) -> None:
    """The status of a job (its submission id, or its driver's job id)."""
    info = _calling(_client(address).get_job_info, job_id)
    click.echo(f"Status for job '{job_id}': {info.status.value}")
    if info.message:
        click.echo(f"Status message: {info.message}")


@job.command()
@address_option
@click.option("-f", "--follow", is_flag=True, help="Follow the output until the job ends.")
@click.argument("job_id")
def logs(address: str | None, follow: bool, job_id: str) -> None:
    """A job's output (stdout and stderr of its entrypoint)."""
    client = _client(address)
    if follow:
        _follow(client, job_id)
    else:
        click.echo(_calling(client.get_job_logs, job_id), nl=False)


@job.command()
@address_option
@click.option("--no-wait", is_flag=True, help="Do not wait for the job to end.")
@click.argument("job_id")
def stop(address: str | None, no_wait: bool, job_id: str) -> None:
    """Stop a job (SIGTERM to its entrypoint's processes, SIGKILL after 3s)."""
    client = _client(address)
    click.echo(f"Attempting to stop job '{job_id}'")
    if not _calling(client.stop_job, job_id):
        click.echo(f"Job '{job_id}' had ended already")
        return
    while not no_wait and not _calling(client.get_job_status, job_id).is_terminal():
        time.sleep(_WAIT_POLL_S)
    click.echo(f"Job '{job_id}' was stopped" if not no_wait else "Stop requested")


@job.command("list")
@address_option
@click.option("--json", "as_json", is_flag=True, help="Every job's details as JSON.")
def list_jobs(address: str | None, as_json: bool) -> None:
    """Every job submitted to the cluster."""
    found = _calling(_client(address).list_jobs)
    if as_json:
        click.echo(json.dumps([_plain(info) for info in found], indent=2))
        return
    for info in found:
        click.echo(f"{info.submission_id}  {info.status.value:<9}  {info.entrypoint}")


def _plain(info: Any) -> dict[str, Any]:
    plain = asdict(info)
    plain["status"] = info.status.value
    return plain


@job.command()
@address_option
@click.argument("job_id")
def delete(address: str | None, job_id: str) -> None:
    """Delete an ended job's record (its output stays on the head)."""
    _calling(_client(address).delete_job, job_id)
    click.echo(f"Job '{job_id}' deleted successfully")
