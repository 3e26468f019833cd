"""The driver's runtime: the GCS it uses (embedded by default), the head node daemon it
started, and its connection to that daemon. ``sdk.init`` makes one; ``sdk.shutdown``
and interpreter exit stop everything it started."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from controlplane.gcs import Gcs
from controlplane.node.daemon import new_node_id
from controlplane.session_dirs import new_session_dir
from dataplane import context, shm
from dataplane.client import CoreClient

_DAEMON_START_TIMEOUT_S = 60.0


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


class Runtime:
    def __init__(
        self,
        gcs: Gcs,
        session_dir: Path,
        daemon: subprocess.Popen[bytes],
        client: CoreClient,
        owns_session_dir: bool,
    ) -> None:
        self.gcs = gcs
        self.session_dir = session_dir
        self.daemon = daemon
        self.client = client
        self._owns_session_dir = owns_session_dir
        atexit.register(self.shutdown)

    @classmethod
    def start(cls, *, gcs_url: str | None, config: NodeConfig, namespace: str | None) -> Runtime:
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
            client = CoreClient(str(session_dir / "node.sock"), "driver", namespace=namespace)
        except BaseException:
            with contextlib.suppress(Exception):
                daemon.kill()
            gcs.stop()
            raise
        context.set_client(client)
        return cls(gcs, session_dir, daemon, client, owns)

    def shutdown(self) -> None:
        atexit.unregister(self.shutdown)
        if context.current_client() is self.client:
            context.set_client(None)
        self.client.close()
        if self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(15)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        shm.unlink_all(self.client.welcome.node_id)
        self.gcs.stop()
        if self._owns_session_dir:
            shutil.rmtree(self.session_dir, ignore_errors=True)


def _wait_ready(daemon: subprocess.Popen[bytes], session_dir: Path) -> None:
    deadline = time.monotonic() + _DAEMON_START_TIMEOUT_S
    ready = session_dir / "node.ready"
    while not ready.exists():
        if daemon.poll() is not None:
            raise RuntimeError(f"the node daemon exited with code {daemon.returncode} on start")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node daemon did not start within {_DAEMON_START_TIMEOUT_S}s")
        time.sleep(0.01)
