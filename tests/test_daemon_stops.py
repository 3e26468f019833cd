"""A node daemon that stops on an error tells its clients why, so their calls fail with
the reason instead of a bare "went away": when the cluster declared it dead (it was
paused past the death timeout, so its appends are fenced), and when a vital background
task fails (its log follower meets an event it cannot read). A daemon that refuses its
GCS says why too (tests/test_storage_faults.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from log_rows import fetch_rows

from controlplane.eventlog import EntityKind, Event
from controlplane.eventlog.appender import append_on
from controlplane.gcs_url import ENV_VAR as GCS_URL_ENV
from controlplane.membership import MembershipMonitor
from dataplane import protocol as p
from dataplane import shm

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    node_id: str
    socket: str


@contextmanager
def head_daemon(gcs_url: str, session_dir: Path) -> Iterator[Daemon]:
    """A head node's daemon on its own (``python -m controlplane.node``), in a cluster
    of one: liveness pings, a membership monitor and a log follower."""
    node_id = uuid.uuid4().hex
    process = subprocess.Popen(
        [
            sys.executable, "-m", "controlplane.node", "--session-dir", str(session_dir),
            "--node-id", node_id, "--resources", '{"CPU": 1}',
            "--object-store-memory", str(64 * 1024 * 1024), "--rpc-port", "0", "--head",
            "--disable-auth", "--die-with-parent",
        ],
        env={**os.environ, GCS_URL_ENV: gcs_url},
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (session_dir / "node.ready").exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the node daemon did not start"
            time.sleep(0.05)
        yield Daemon(process, node_id, str(session_dir / "node.sock"))
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.terminate()
        process.communicate(timeout=30)
        shm.unlink_all(node_id)


async def _driver(daemon: Daemon) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A driver's connection (the writer kept: dropping it closes the connection)."""
    reader, writer = await asyncio.open_unix_connection(daemon.socket)
    writer.write(p.encode(p.Hello("driver", os.getpid())))
    assert isinstance(await p.read_message(reader), p.Welcome)
    return reader, writer


async def _stop_reason(reader: asyncio.StreamReader) -> str:
    """What the daemon tells a driver when it stops (other messages are passed over)."""
    while True:
        message = await asyncio.wait_for(p.read_message(reader), 30)
        if isinstance(message, p.Shutdown):
            return message.reason


async def test_a_daemon_declared_dead_tells_its_drivers_why_it_stops(
    gcs_url: str, tmp_path: Path
) -> None:
    with head_daemon(gcs_url, tmp_path) as daemon:
        reader, _writer = await _driver(daemon)
        os.kill(daemon.process.pid, signal.SIGSTOP)  # silent: its pings stop
        try:
            await asyncio.sleep(1.5)
            monitor = MembershipMonitor(gcs_url, dead_after=1.0)
            try:
                assert await monitor.check_once() == [daemon.node_id]
            finally:
                await monitor.close()
        finally:
            os.kill(daemon.process.pid, signal.SIGCONT)
        reason = await _stop_reason(reader)
        assert reason.startswith("the node daemon stopped: the cluster declared this node dead")
        assert daemon.process.wait(timeout=30) is not None
    rows = await fetch_rows(
        gcs_url,
        "SELECT payload->>'cause' AS cause FROM events WHERE entity_kind = 'node'"
        " AND event_type = 'dead'",
    )
    assert [r["cause"].split(":")[0] for r in rows] == ["missed heartbeats"]  # one death


async def test_a_daemon_whose_log_follower_fails_tells_its_drivers_why_it_stops(
    gcs_url: str, tmp_path: Path
) -> None:
    with head_daemon(gcs_url, tmp_path) as daemon:
        reader, _writer = await _driver(daemon)
        conn = await asyncpg.connect(gcs_url)
        try:  # a task placed on the node whose spec cannot be read
            payload = {"node_id": daemon.node_id, "attempt": 0, "to_node": daemon.node_id}
            placed = Event(EntityKind.TASK, "t-damaged", "placed", payload, data=b"\x00damaged")
            await append_on(conn, [placed])
        finally:
            await conn.close()
        reason = await _stop_reason(reader)
        assert reason.startswith("the node daemon stopped: RemoteTasks.follow_log failed: ")
        assert daemon.process.wait(timeout=30) is not None
