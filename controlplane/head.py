"""A head node: the GCS (embedded PostgreSQL unless a URL is given) and a node daemon,
started and stopped together. ``sdk.init()`` runs a private one; ``cairn start --head``
runs one that outlives its drivers and records itself as this machine's current cluster
(a pointer file in the temp directory, as Ray's ``session_latest``), which
``init(address="auto")`` and ``cairn stop``/``status`` find.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from controlplane.gcs import Gcs
from controlplane.node.daemon import new_node_id
from controlplane.session_dirs import new_session_dir
from dataplane import shm

_DAEMON_START_TIMEOUT_S = 60.0
CURRENT_CLUSTER_FILE = "cairn-current-cluster"
HEAD_PID_FILE = "head.pid"
NODE_SOCKET = "node.sock"


def default_object_store_memory() -> int:
    """30% of the machine's memory, as Ray, but no more than /dev/shm can hold."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    shm_free = shutil.disk_usage(shm.SHM_DIR).free
    return int(min(total * 0.3, shm_free * 0.8))


@dataclass
class NodeConfig:
    resources: dict[str, float]
    object_store_memory: int


def node_config(
    num_cpus: float | None,
    num_gpus: float | None,
    resources: dict[str, float] | None,
    object_store_memory: int | None,
) -> NodeConfig:
    for name, value in (
        ("num_cpus", num_cpus),
        ("num_gpus", num_gpus),
        ("object_store_memory", object_store_memory),
    ):
        if value is not None and (not isinstance(value, int | float) or value < 0):
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    total: dict[str, float] = {
        "CPU": float(num_cpus if num_cpus is not None else os.cpu_count() or 1),
        "GPU": float(num_gpus or 0),
    }
    for key, amount in (resources or {}).items():
        if key in ("CPU", "GPU"):
            raise ValueError(f"use num_cpus / num_gpus instead of resources[{key!r}]")
        total[key] = float(amount)
    memory = object_store_memory or default_object_store_memory()
    total["object_store_memory"] = float(memory)
    return NodeConfig(total, int(memory))


class HeadNode:
    """The processes of a head node; ``stop()`` ends them and removes what they left."""

    def __init__(
        self,
        gcs: Gcs,
        session_dir: Path,
        daemon: subprocess.Popen[bytes],
        node_id: str,
        owns_session_dir: bool,
    ) -> None:
        self.gcs = gcs
        self.session_dir = session_dir
        self.daemon = daemon
        self.node_id = node_id
        self._owns_session_dir = owns_session_dir

    @property
    def socket_path(self) -> str:
        return str(self.session_dir / NODE_SOCKET)

    @classmethod
    def start(cls, *, gcs_url: str | None, config: NodeConfig) -> HeadNode:
        gcs = Gcs(gcs_url)
        gcs.start()
        owns = gcs.embedded is None
        session_dir = new_session_dir() if owns else gcs.embedded.session_dir  # type: ignore[union-attr]
        node_id = new_node_id()
        try:
            daemon = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "controlplane.node",
                    "--session-dir",
                    str(session_dir),
                    "--gcs-url",
                    gcs.url,
                    "--node-id",
                    node_id,
                    "--resources",
                    json.dumps(config.resources),
                    "--object-store-memory",
                    str(config.object_store_memory),
                    "--die-with-parent",
                ],
                stdin=subprocess.DEVNULL,
            )
            _wait_ready(daemon, session_dir)
        except BaseException:
            with contextlib.suppress(Exception):
                daemon.kill()
            gcs.stop()
            if owns:
                shutil.rmtree(session_dir, ignore_errors=True)
            raise
        return cls(gcs, session_dir, daemon, node_id, owns)

    def stop(self) -> None:
        if self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(15)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        shm.unlink_all(self.node_id)
        self.gcs.stop()
        if self._owns_session_dir:
            shutil.rmtree(self.session_dir, ignore_errors=True)


# -- the current cluster of this machine ------------------------------------------------


def current_cluster_file() -> Path:
    return Path(tempfile.gettempdir()) / CURRENT_CLUSTER_FILE


def record_current(head: HeadNode) -> None:
    """Makes ``head`` this machine's current cluster (written atomically)."""
    (head.session_dir / HEAD_PID_FILE).write_text(str(os.getpid()))
    pointer = current_cluster_file()
    temporary = pointer.with_suffix(f".{os.getpid()}")
    temporary.write_text(json.dumps({"session_dir": str(head.session_dir), "pid": os.getpid()}))
    temporary.replace(pointer)


def forget_current(session_dir: Path) -> None:
    """Removes the pointer if it still points at ``session_dir``."""
    found = read_current()
    if found is not None and found[0] == session_dir:
        current_cluster_file().unlink(missing_ok=True)


def read_current() -> tuple[Path, int] | None:
    """(session directory, head pid) of the current cluster, if one is recorded."""
    try:
        record = json.loads(current_cluster_file().read_text())
        return Path(record["session_dir"]), int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_running() -> Path:
    """The session directory of the running current cluster; ConnectionError naming
    what was looked for when there is none."""
    found = read_current()
    if found is None:
        raise ConnectionError(
            f"no running Cairn cluster was found (no {current_cluster_file()}): "
            "start one with `cairn start --head`"
        )
    session_dir, pid = found
    if not _alive(pid) or not (session_dir / NODE_SOCKET).exists():
        raise ConnectionError(
            f"the cluster recorded in {current_cluster_file()} (head pid {pid}, "
            f"{session_dir}) is not running: start one with `cairn start --head`"
        )
    return session_dir


def is_running(session_dir: Path, pid: int) -> bool:
    return _alive(pid) and (session_dir / NODE_SOCKET).exists()


def run_head(gcs_url: str | None, config: NodeConfig, announce: Callable[[str], None]) -> None:
    """Runs a head node in this process until SIGTERM/SIGINT (`cairn stop`, Ctrl-C) or
    until its node daemon exits; then stops it and forgets it as the current cluster."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    head = HeadNode.start(gcs_url=gcs_url, config=config)
    try:
        record_current(head)
        announce(f"head node {head.node_id} is running (session {head.session_dir})")
        while not stopping.wait(0.2):
            if head.daemon.poll() is not None:
                announce(f"the node daemon exited with code {head.daemon.returncode}")
                break
    finally:
        forget_current(head.session_dir)
        head.stop()


def start_head_in_background(gcs_url: str | None, config: NodeConfig) -> Path:
    """Starts ``run_head`` in a new session (it outlives this process) and waits until
    it is recorded as the current cluster; its output goes to a log file."""
    log_path = Path(tempfile.gettempdir()) / "cairn-head.log"
    command = [sys.executable, "-m", "controlplane.cli", "start", "--head", "--block"]
    command += ["--node-config", json.dumps(asdict(config))]
    if gcs_url is not None:
        command += ["--gcs-url", gcs_url]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + _DAEMON_START_TIMEOUT_S * 2
    while True:
        found = read_current()
        if found is not None and found[1] == process.pid and is_running(*found):
            return found[0]
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the head node did not start; its log ({log_path}):\n{tail}")
        time.sleep(0.05)


def stop_current(timeout: float) -> str:
    """Stops the current cluster's head process (SIGTERM, then SIGKILL of its process
    group after ``timeout`` seconds); says what it did."""
    found = read_current()
    if found is None:
        return "no Cairn cluster is running here"
    session_dir, pid = found
    if not _alive(pid):
        current_cluster_file().unlink(missing_ok=True)
        return f"the recorded cluster (head pid {pid}) was not running; forgot it"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        current_cluster_file().unlink(missing_ok=True)
        return f"the head (pid {pid}) did not stop within {timeout:g}s: killed it"
    return f"stopped the cluster (head pid {pid}, session {session_dir})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_ready(daemon: subprocess.Popen[bytes], session_dir: Path) -> None:
    deadline = time.monotonic() + _DAEMON_START_TIMEOUT_S
    ready = session_dir / "node.ready"
    while not ready.exists():
        if daemon.poll() is not None:
            raise RuntimeError(f"the node daemon exited with code {daemon.returncode} on start")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node daemon did not start within {_DAEMON_START_TIMEOUT_S}s")
        time.sleep(0.01)
