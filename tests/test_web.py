"""The head's HTTP service (controlplane/web): started by `cairn start --head` (its
address in the session's ``dashboard.address``), stopped with the head, and run on its
own by `cairn dashboard --gcs-url URL` over nothing but the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from machine_cluster import machine_cluster
from processes import pids_with

from controlplane.web.__main__ import ADDRESS_FILE

pytestmark = pytest.mark.timeout(120)


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for_file(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)
    return path.read_text()


def test_the_head_serves_http_and_stops_it_with_itself() -> None:
    with machine_cluster(["--num-cpus", "1", "--dashboard-port", "0"]) as cluster:
        address = wait_for_file(cluster.head.session_dir / ADDRESS_FILE)
        status, answer = get_json(f"http://{address}/api/cairn/health")
        assert status == 200 and answer == {"ok": True}
        assert pids_with("controlplane.web", str(cluster.head.session_dir))
    assert not pids_with("controlplane.web", str(cluster.head.session_dir))


def test_cairn_dashboard_serves_a_log_on_its_own(gcs_url: str) -> None:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane.cli",
            "dashboard",
            "--gcs-url",
            gcs_url,
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        address = line.rsplit("http://", 1)[1].strip()
        status, answer = get_json(f"http://{address}/api/cairn/health")
        assert status == 200 and answer == {"ok": True}
    finally:
        server.terminate()
        server.wait(30)
