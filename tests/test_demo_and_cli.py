"""The README's demo and the ``cairn`` command, run as a user runs them: as processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(180)


def cairn(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from controlplane.cli import run; run()", *args],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )


def test_demo_on_the_embedded_default_runs_and_reports() -> None:
    result = cairn("demo", "--writers", "2", "--tasks", "200")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "embedded PostgreSQL at postgresql://cairn_runtime:***@127.0.0.1:" in out
    assert "appended 1,200 events" in out  # (400 tasks x 3 transitions)
    assert "exactly once" in out
    assert "FINISHED 400" in out


def test_partitions_list_against_a_given_url(gcs_url: str) -> None:
    assert cairn("migrate", "--gcs-url", gcs_url).returncode == 0
    from controlplane.eventlog.partitions import PartitionManager

    PartitionManager(gcs_url).ensure_ahead()
    result = cairn("partitions", "list", "--gcs-url", gcs_url)
    assert result.returncode == 0, result.stderr
    assert "events_p0000000000000000001  [1, 1000001)  attached" in result.stdout


def test_unreachable_gcs_is_a_clear_one_line_error() -> None:
    result = cairn("migrate", "--gcs-url", "postgresql://u:topsecret@127.0.0.1:1/db")
    assert result.returncode == 1
    assert "cannot reach the GCS at postgresql://u:***@127.0.0.1:1/db" in result.stderr
    assert "topsecret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_the_readme_demo_runs_a_ray_program_and_reports_its_log() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sdk.demo"], capture_output=True, text=True, timeout=150
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "pi ~ 3.14" in out
    assert "wait: 4 ready, 4 pending" in out
    assert "task.finished" in out and "sample FINISHED" in out
