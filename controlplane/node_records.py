"""The records of the nodes this machine runs (``cairn-nodes/<pid>.json`` in the temp
directory, as Ray's ``session_latest``): each process running a node records it, and
``init(address="auto")``, ``cairn status``, ``cairn stop`` and the cluster token's
lookup (auth.find_token) read them.

Below both local_node (which writes them) and auth (which reads them), so that neither
imports the other for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from controlplane.session_dirs import alive, sweep_stale
from dataplane import shm

NODES_DIR = "cairn-nodes"
NODE_SOCKET = "node.sock"


@dataclass
class NodeRecord:
    pid: int  # the process running the node (`cairn start ... --block`)
    session_dir: Path
    head: bool
    address: str | None
    cluster: str | None = None  # the head's address (its own, for the head)

    @property
    def running(self) -> bool:
        return alive(self.pid) and (self.session_dir / NODE_SOCKET).exists()


def nodes_dir() -> Path:
    return Path(tempfile.gettempdir()) / NODES_DIR


def record_node(session_dir: Path, address: str | None, head: bool, cluster: str | None) -> Path:
    """Records the node of ``session_dir`` as run by this process (written atomically)."""
    directory = nodes_dir()
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{os.getpid()}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(
        json.dumps(
            {
                "session_dir": str(session_dir),
                "head": head,
                "address": address,
                "cluster": cluster or address,
            }
        )
    )
    temporary.replace(path)
    return path


def local_nodes() -> list[NodeRecord]:
    """The nodes recorded on this machine (records of processes that are gone are
    removed)."""
    found = []
    for path in sorted(nodes_dir().glob("*.json")):
        try:
            record = json.loads(path.read_text())
            node = NodeRecord(
                int(path.stem),
                Path(record["session_dir"]),
                bool(record["head"]),
                record["address"],
                record.get("cluster"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if alive(node.pid):
            found.append(node)
        else:
            _clean_up_after(node)
            path.unlink(missing_ok=True)
    return found


def node_log(pid: int) -> Path:
    """Where a node started in the background writes its output (warnings included);
    removed when the node is stopped."""
    return Path(tempfile.gettempdir()) / f"cairn-node-{pid}.log"


def _clean_up_after(node: NodeRecord) -> None:
    """What a node killed outright (SIGKILL of its process group) left behind: its
    shared-memory segments and, once nothing of it runs, its session directory."""
    with contextlib.suppress(OSError):
        shm.unlink_all((node.session_dir / "node.ready").read_text().strip())
    node_log(node.pid).unlink(missing_ok=True)
    sweep_stale()


def running_head() -> NodeRecord | None:
    return next((n for n in local_nodes() if n.head and n.running), None)


def find_running(address: str | None = None) -> Path:
    """The session directory of a node of the cluster whose head is at ``address``
    running on this machine (the head's own if it runs here), or with no address, of
    this machine's running head, else of its node (as Ray's ``address="auto"`` on a
    machine that runs a node of a cluster); ConnectionError saying what was looked for
    when there is none, or when nodes of several clusters run here."""
    if address is not None:
        members = [n for n in local_nodes() if n.running and n.cluster == address]
        if not members:
            raise ConnectionError(
                f"no node of the cluster at {address} runs on this machine: a driver "
                f"connects through a node of its own machine (start one with `cairn start "
                f"--address {address}`)"
            )
        return sorted(members, key=lambda n: not n.head)[0].session_dir
    head = running_head()
    if head is not None:
        return head.session_dir
    clusters = {n.cluster: n for n in local_nodes() if n.running}
    if len(clusters) > 1:
        raise ConnectionError(
            f"nodes of several clusters run on this machine ({', '.join(map(str, clusters))}):"
            " say which, with address=HEAD:PORT"
        )
    if not clusters:
        raise ConnectionError(
            f"no running Cairn cluster was found (no node recorded in {nodes_dir()}): "
            "start one with `cairn start --head`, or join one with `cairn start --address`"
        )
    return next(iter(clusters.values())).session_dir


def stop_local_nodes(timeout: float) -> list[str]:
    """Stops every node this machine runs, worker nodes before the head (SIGTERM, then
    SIGKILL of the node's process group after ``timeout`` seconds); says what it did."""
    nodes = sorted(local_nodes(), key=lambda n: n.head)
    for node in nodes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    said = []
    for node in nodes:
        kind = "head" if node.head else "node"
        if stop_node(node.pid, max(0.0, deadline - time.monotonic())):
            said.append(f"stopped the {kind} (pid {node.pid}, {node.session_dir})")
        else:
            said.append(f"the {kind} (pid {node.pid}) did not stop within {timeout:g}s: killed")
    return said or ["no Cairn node is running here"]


def stop_node(pid: int, timeout: float, graceful: bool = True) -> bool:
    """Stops the node process ``pid`` (SIGTERM, waited for ``timeout`` seconds; then,
    or at once when not ``graceful``, SIGKILL of its process group) and forgets its
    record and output file. True if it stopped by itself."""
    if graceful:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    stopped = graceful and not alive(pid)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        while alive(pid):
            time.sleep(0.01)
    (nodes_dir() / f"{pid}.json").unlink(missing_ok=True)
    node_log(pid).unlink(missing_ok=True)
    return stopped
