"""Job submission (Ray's Jobs API): on a head started with `cairn start --head`, jobs
submitted over HTTP (sdk.job_submission.JobSubmissionClient) run their entrypoint as a
driver on the head, in their working_dir and runtime_env; their output is served and
followed; they succeed, fail with their error, or are stopped; their lives are in the
log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from log_rows import rows
from machine_cluster import MachineCluster, machine_cluster
from processes import dashboard_address, gcs_url_of, pids_with, run_cairn, run_driver

from sdk.job_submission import JobStatus, JobSubmissionClient
from sdk.util.state import get_log, list_jobs

pytestmark = pytest.mark.timeout(300)

SCRIPT = """
import os
import sdk as ray

ray.init()

@ray.remote
def square(x):
    return x * x

@ray.remote
def flavour():
    return os.environ.get("JOB_FLAVOUR", "none")

@ray.remote
def greeting():
    import job_helper
    return job_helper.GREETING

import job_helper  # a py_module of the job: on the driver's path and its tasks'

print("squares", ray.get([square.remote(i) for i in range(4)]), flush=True)
print("flavour", ray.get(flavour.remote()), flush=True)
print("helper", job_helper.GREETING, ray.get(greeting.remote()), flush=True)
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[MachineCluster]:
    head = ["--num-cpus", "2", "--dashboard-port", "0"]
    with machine_cluster(head) as running:
        yield running


def service_address(cluster: MachineCluster, other_than: str = "") -> str:
    """The head's HTTP service's address (once it is not ``other_than``)."""
    return dashboard_address(cluster.head.session_dir, other_than)


@pytest.fixture
def client(cluster: MachineCluster) -> JobSubmissionClient:
    return JobSubmissionClient(f"http://{service_address(cluster)}")


def wait_for_status(
    client: JobSubmissionClient, submission_id: str, *wanted: JobStatus, timeout: float = 120
) -> JobStatus:
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(submission_id)) not in wanted:
        assert time.monotonic() < deadline, f"{submission_id} is {status}, not {wanted}"
        time.sleep(0.1)
    return status


async def _follow(client: JobSubmissionClient, submission_id: str) -> str:
    return "".join([chunk async for chunk in client.tail_job_logs(submission_id)])


def test_a_job_runs_in_its_working_dir_and_runtime_env(
    client: JobSubmissionClient, cluster: MachineCluster, tmp_path: Path
) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "script.py").write_text(SCRIPT)
    (tmp_path / "job_helper.py").write_text("GREETING = 'hi'\n")
    submission_id = client.submit_job(
        entrypoint="python script.py",
        runtime_env={
            "working_dir": str(tmp_path / "job"),
            "py_modules": [str(tmp_path / "job_helper.py")],
            "env_vars": {"JOB_FLAVOUR": "mint"},
        },
        metadata={"owner": "tests"},
    )
    assert submission_id.startswith("raysubmit_")
    followed = asyncio.run(_follow(client, submission_id))
    assert "squares [0, 1, 4, 9]" in followed
    assert "flavour mint" in followed  # the job's env_vars reached its tasks
    assert "helper hi hi" in followed  # its py_modules, the driver's and its tasks'
    assert client.get_job_status(submission_id) == JobStatus.SUCCEEDED
    info = client.get_job_info(submission_id)
    assert info.driver_exit_code == 0 and info.metadata == {"owner": "tests"}
    assert info.type == "SUBMISSION" and info.entrypoint == "python script.py"
    assert info.runtime_env["working_dir"].startswith("cairn://pkg/")
    assert info.job_id is not None  # the driver's own job, linked by its node
    assert info.start_time is not None and info.end_time is not None
    assert client.get_job_logs(submission_id) == followed
    # ... and through the state API, read by the head's node (its ReadLog call)
    url = gcs_url_of(cluster.head.session_dir)
    assert list(get_log(submission_id=submission_id, address=url)) == followed.splitlines()
    # the job's life is in the log, and its driver's job names it
    life = rows(
        url,
        "SELECT event_type, payload FROM events WHERE entity_kind = 'submission' "
        "AND entity_id = $1 ORDER BY position",
        submission_id,
    )
    types = [row["event_type"] for row in life]
    assert types[0] == "submitted" and types[-1] == "succeeded"
    assert {"running", "driver_started"} <= set(types)
    submitted = json.loads(life[0]["payload"])
    assert submitted["entrypoint"] == "python script.py"
    assert submitted["runtime_env"]["env_vars"] == {"JOB_FLAVOUR": "mint"}
    driver = rows(
        url,
        "SELECT payload->>'submission_id' AS submission_id FROM events "
        "WHERE entity_kind = 'job' AND entity_id = $1 AND event_type = 'submitted'",
        info.job_id,
    )
    assert [row["submission_id"] for row in driver] == [submission_id]
    # the state API shows the driver's job as Ray's: a SUBMISSION, with the submission's
    (listed,) = list_jobs(address=url, filters=[("submission_id", "=", submission_id)], detail=True)
    assert (listed.job_id, listed.type, listed.entrypoint) == (
        info.job_id,
        "SUBMISSION",
        "python script.py",
    )
    assert listed.metadata == {"owner": "tests"} and listed.status == "SUCCEEDED"


PIP_SCRIPT = """
import tomli_w  # (the job's pip env: the entrypoint's own imports see it)
import sdk as ray

ray.init()

@ray.remote
def dump():
    import tomli_w
    return tomli_w.dumps({"k": 1})

print("entrypoint", tomli_w.dumps({"a": 1}).strip(), "task", ray.get(dump.remote()).strip())
"""


def test_a_jobs_pip_env_is_its_entrypoints_and_its_tasks(
    client: JobSubmissionClient, tmp_path: Path
) -> None:
    (tmp_path / "script.py").write_text(PIP_SCRIPT)
    submission_id = client.submit_job(
        entrypoint="python script.py",
        runtime_env={"working_dir": str(tmp_path), "pip": ["tomli-w==1.0.0"]},
    )
    status = wait_for_status(
        client, submission_id, JobStatus.SUCCEEDED, JobStatus.FAILED, timeout=100
    )
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert "entrypoint a = 1 task k = 1" in logs
    assert "tomli" in logs.split("entrypoint a = 1")[0]  # pip's output first, as Ray's setup logs


def test_a_failing_job_fails_with_its_error(client: JobSubmissionClient) -> None:
    submission_id = client.submit_job(
        entrypoint="python -c \"import sys; print('about to fail'); sys.exit(3)\"",
        submission_id="failing-job",
    )
    assert submission_id == "failing-job"
    wait_for_status(client, submission_id, JobStatus.FAILED)
    info = client.get_job_info(submission_id)
    assert info.driver_exit_code == 3
    assert info.error_type == "JOB_ENTRYPOINT_COMMAND_ERROR"
    assert info.message is not None and "exit code 3" in info.message
    assert "about to fail" in info.message
    with pytest.raises(RuntimeError, match="already exists"):
        client.submit_job(entrypoint="echo again", submission_id="failing-job")


def test_stopping_a_job_ends_its_process(
    client: JobSubmissionClient, cluster: MachineCluster
) -> None:
    submission_id = client.submit_job(entrypoint="python -c 'import time; time.sleep(600)'")
    wait_for_status(client, submission_id, JobStatus.RUNNING)
    assert pids_with("time.sleep(600)")
    assert client.stop_job(submission_id) is True
    wait_for_status(client, submission_id, JobStatus.STOPPED)
    assert not pids_with("time.sleep(600)")
    assert client.stop_job(submission_id) is False  # it had ended
    with pytest.raises(RuntimeError, match="404"):
        client.stop_job("no-such-job")


def test_list_and_delete(client: JobSubmissionClient, tmp_path: Path) -> None:
    plain = run_driver(
        tmp_path,
        "import sdk as ray\nray.init(address='auto')\n"
        "print(ray.get_runtime_context().get_job_id())",
    ).stdout.split()[-1]
    done = client.submit_job(entrypoint="echo listed", submission_id="listed-job")
    wait_for_status(client, done, JobStatus.SUCCEEDED)
    assert client.get_job_logs(done) == "listed\n"
    running = client.submit_job(entrypoint="python -c 'import time; time.sleep(600)'")
    wait_for_status(client, running, JobStatus.RUNNING)
    listed = {job.submission_id: job.status for job in client.list_jobs()}
    assert listed[done] == JobStatus.SUCCEEDED and listed[running] == JobStatus.RUNNING
    drivers = {job.job_id: job for job in client.list_jobs() if job.type == "DRIVER"}
    assert drivers[plain].status == JobStatus.SUCCEEDED  # (a driver no submission started)
    with pytest.raises(RuntimeError, match="non-terminal"):
        client.delete_job(running)
    client.stop_job(running)
    assert client.delete_job(done) is True
    assert done not in {job.submission_id for job in client.list_jobs()}
    with pytest.raises(RuntimeError, match="404"):
        client.get_job_info(done)


def test_bad_submissions_are_refused_with_what_is_wrong(client: JobSubmissionClient) -> None:
    with pytest.raises(RuntimeError, match="entrypoint_num_cpus is not supported"):
        client.submit_job(entrypoint="echo", entrypoint_num_cpus=1)
    with pytest.raises(RuntimeError, match="submission_id"):
        client.submit_job(entrypoint="echo", submission_id="../escape")
    with pytest.raises(RuntimeError, match="entrypoint must be"):
        client.submit_job(entrypoint="  ")
    with pytest.raises(RuntimeError, match=r"\['conda'\] are not supported"):
        client.submit_job(entrypoint="echo", runtime_env={"conda": "env"})


def test_the_version_and_the_address_from_the_environment(
    client: JobSubmissionClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client.get_version() == "3"
    monkeypatch.setenv("RAY_ADDRESS", client.get_address())
    assert JobSubmissionClient().get_address() == client.get_address()
    monkeypatch.delenv("RAY_ADDRESS")
    # no address at all: this machine's head's service
    assert JobSubmissionClient().get_address() == client.get_address()


def test_the_cli_submits_and_streams_a_job(client: JobSubmissionClient, tmp_path: Path) -> None:
    (tmp_path / "script.py").write_text(SCRIPT)
    (tmp_path / "job_helper.py").write_text("GREETING = 'hi'\n")  # (in its working_dir)
    submitted = run_cairn(
        "job",
        "submit",
        "--working-dir",
        str(tmp_path),
        "--runtime-env-json",
        json.dumps({"env_vars": {"JOB_FLAVOUR": "lime"}}),
        "--submission-id",
        "cli-job",
        "--",
        "python",
        "script.py",
    )
    assert "Job 'cli-job' submitted successfully" in submitted.stdout
    assert "squares [0, 1, 4, 9]" in submitted.stdout
    assert "flavour lime" in submitted.stdout
    assert "Job 'cli-job' succeeded" in submitted.stdout
    status = run_cairn("job", "status", "cli-job", "--address", client.get_address())
    assert "Status for job 'cli-job': SUCCEEDED" in status.stdout
    assert "flavour lime" in run_cairn("job", "logs", "cli-job").stdout
    assert "cli-job  SUCCEEDED" in run_cairn("job", "list").stdout
    assert "deleted" in run_cairn("job", "delete", "cli-job").stdout
    assert "cli-job" not in run_cairn("job", "list").stdout


def test_the_cli_exits_1_for_a_failed_job() -> None:
    failed = run_cairn(
        "job", "submit", "--", "python", "-c", "'import sys; sys.exit(2)'", check=False
    )
    assert failed.returncode == 1
    assert "failed" in failed.stdout and "exit code 2" in failed.stderr
    stopped = run_cairn("job", "submit", "--no-wait", "--", "sleep", "600")
    submission_id = stopped.stdout.split("Job '", 1)[1].split("'", 1)[0]
    assert "was stopped" in run_cairn("job", "stop", submission_id).stdout
    refused = run_cairn("job", "status", "no-such-job", check=False)
    assert refused.returncode != 0 and "does not exist" in refused.stderr


def test_a_job_whose_supervisor_died_is_marked_failed(
    client: JobSubmissionClient, cluster: MachineCluster
) -> None:
    """The head's HTTP service supervises the jobs: killed, its drivers end with it, the
    head starts another, and that one marks the jobs left running FAILED."""
    submission_id = client.submit_job(
        entrypoint="python -c 'import time; time.sleep(601)' && echo never"
    )
    wait_for_status(client, submission_id, JobStatus.RUNNING)
    session = str(cluster.head.session_dir)
    (web,) = pids_with("controlplane.web", session)
    os.kill(web, signal.SIGKILL)
    old = client.get_address().removeprefix("http://")
    again = JobSubmissionClient(f"http://{service_address(cluster, other_than=old)}")
    info = again.get_job_info(submission_id)
    assert info.status == JobStatus.FAILED
    assert info.error_type == "JOB_SUPERVISOR_ACTOR_DIED"
    deadline = time.monotonic() + 30
    while pids_with("time.sleep(601)"):
        assert time.monotonic() < deadline, "the job's driver outlived its supervisor"
        time.sleep(0.1)
    # the new service takes new jobs
    done = again.submit_job(entrypoint="echo after")
    assert wait_for_status(again, done, JobStatus.SUCCEEDED, JobStatus.FAILED) == "SUCCEEDED"


def test_cairn_dashboard_answers_for_jobs_from_the_log_alone(
    client: JobSubmissionClient, cluster: MachineCluster
) -> None:
    done = client.submit_job(entrypoint="echo from the log")
    wait_for_status(client, done, JobStatus.SUCCEEDED)
    server = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "dashboard", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "CAIRN_GCS_URL": gcs_url_of(cluster.head.session_dir)},
    )
    try:
        assert server.stdout is not None
        address = server.stdout.readline().rsplit("http://", 1)[1].strip()
        standalone = JobSubmissionClient(f"http://{address}")
        assert standalone.get_job_info(done).status == JobStatus.SUCCEEDED
        assert done in {job.submission_id for job in standalone.list_jobs()}
        with pytest.raises(RuntimeError, match="reads the log only"):
            standalone.submit_job(entrypoint="echo refused")
    finally:
        server.terminate()
        server.wait(30)
