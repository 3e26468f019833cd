"""The head's HTTP service (controlplane/web): started by `cairn start --head` (its
address in the session's ``dashboard.address``), stopped with the head, and run on its
own by `cairn dashboard --gcs-url URL` over nothing but the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from machine_cluster import machine_cluster
from processes import dashboard_address, pids_with, run_driver

pytestmark = pytest.mark.timeout(120)


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_head_serves_http_and_stops_it_with_itself(tmp_path: Path) -> None:
    with machine_cluster(["--num-cpus", "1", "--dashboard-port", "0"]) as cluster:
        address = dashboard_address(cluster.head.session_dir)
        status, answer = get_json(f"http://{address}/api/cairn/health")
        assert status == 200 and answer == {"ok": True}
        # a driver of the cluster is told where, as Ray's are (get_dashboard_url, webui_url)
        said = run_driver(
            tmp_path,
            """
            import sdk as ray
            context = ray.init(address="auto")
            print("at", ray.get_runtime_context().get_dashboard_url(), context["webui_url"])
            """,
        )
        assert f"at {address} {address}" in said.stdout
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
        with urllib.request.urlopen(f"http://{address}/", timeout=10) as page:
            assert b"/static/dashboard.js" in page.read()  # the dashboard, over the log
        status, answer = get_json(f"http://{address}/api/cairn/state/tasks?filter=state=FAILED")
        assert status == 200 and answer == {"rows": [], "limit": 100}
        status, answer = get_json(f"http://{address}/api/cairn/lineage/{'0' * 40}")
        assert status == 404 and "no object" in answer["error"]
        status, answer = get_json(f"http://{address}/api/cairn/state/tasks?filter=colour=red")
        assert status == 400 and "colour" in answer["error"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{address}/static/..%2F__init__.py", timeout=10)
        assert refused.value.code == 404  # (only the page's own files are served)
        # a browser's request for another site's page is refused; the page's own passes
        for origin, expected in (("http://evil.example", 403), (f"http://{address}", 200)):
            request = urllib.request.Request(
                f"http://{address}/api/cairn/sql",
                data=json.dumps({"statement": "SELECT 1"}).encode(),
                headers={"Origin": origin, "Content-Type": "text/plain"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    assert (answer.status, json.loads(answer.read())["rows"]) == (200, [[1]])
            except urllib.error.HTTPError as error:
                assert error.code == expected == 403 and "another site" in error.read().decode()
            else:
                assert expected == 200
    finally:
        server.terminate()
        server.wait(30)
