"""``ray.cluster_utils.Cluster``: a cluster of several nodes on this machine, for tests
and experiments, as Ray's. Each node is a real ``cairn start`` node (its own process
group, store and gRPC service, on loopback): the first added is the head, with the
embedded GCS; drivers join with ``init(address=cluster.address)``."""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

from controlplane import node_records
from sdk.api import IGNORED_INIT_ARGS

_STOP_TIMEOUT_S = 15.0
cluster_not_supported = False  # Ray's flag (True on Windows): a cluster runs here


@dataclass
class ClusterNode:
    """One node of the cluster (Ray's ``ray._private.node.Node``, as far as tests use
    it): its process, address and id."""

    pid: int
    address: str | None
    node_id: str
    head: bool

    @property
    def unique_id(self) -> str:
        return self.node_id


class Cluster:
    def __init__(
        self,
        initialize_head: bool = False,
        connect: bool = False,
        head_node_args: dict[str, Any] | None = None,
        shutdown_at_exit: bool = True,
    ) -> None:
        self.head_node: ClusterNode | None = None
        self.worker_nodes: list[ClusterNode] = []
        self._connected = False
        if shutdown_at_exit:  # (as Ray's: its nodes do not outlive this process)
            atexit.register(self.shutdown)
        if initialize_head:
            self.add_node(**(head_node_args or {}))
            if connect:
                self.connect()
        elif connect:
            raise ValueError("Cluster(connect=True) needs initialize_head=True")

    @property
    def address(self) -> str:
        if self.head_node is None or self.head_node.address is None:
            raise RuntimeError("the cluster has no head node yet: add_node() makes it")
        return self.head_node.address

    def connect(self, namespace: str | None = None) -> Any:
        from sdk import api

        context = api.init(address=self.address, namespace=namespace)
        self._connected = True
        return context

    def add_node(self, wait: bool = True, **node_args: Any) -> ClusterNode:
        """The head (the first node added), then nodes joined to it. Takes Ray's
        ``num_cpus``, ``num_gpus``, ``resources``, ``object_store_memory``, ``labels``
        and ``_memory``; other arguments are refused by name."""
        args = _start_args(node_args)
        head = self.head_node is None
        where = ["--head", "--port", "0", "--dashboard-port", "0"] if head else []
        where += [] if head else ["--address", self.address]
        before = {n.pid for n in node_records.local_nodes()}
        done = subprocess.run(
            [sys.executable, "-m", "controlplane.cli", "start", *where, *args],
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode != 0:
            raise RuntimeError(f"cairn start failed: {done.stderr.strip() or done.stdout}")
        records = [n for n in node_records.local_nodes() if n.pid not in before]
        if len(records) != 1:
            raise RuntimeError(f"cairn start recorded {len(records)} new nodes, not 1")
        record = records[0]
        node = ClusterNode(
            record.pid, record.address, (record.session_dir / "node.ready").read_text(), head
        )
        if head:
            self.head_node = node
        else:
            self.worker_nodes.append(node)
            if wait and self._connected:
                self.wait_for_nodes()
        return node

    def remove_node(self, node: ClusterNode, allow_graceful: bool = True) -> None:
        """Stops the node's processes: SIGTERM (a clean stop) or, with
        ``allow_graceful=False``, SIGKILL of its process group (as a crash)."""
        node_records.stop_node(node.pid, _STOP_TIMEOUT_S, graceful=allow_graceful)
        if node is self.head_node:
            self.head_node = None
        elif node in self.worker_nodes:
            self.worker_nodes.remove(node)

    def list_all_nodes(self) -> list[ClusterNode]:
        return ([self.head_node] if self.head_node is not None else []) + self.worker_nodes

    def wait_for_nodes(self, timeout: float = 30) -> None:
        """Until every node of the cluster is alive in the log (and no removed one is)."""
        from sdk import api

        if not api.is_initialized():
            return
        wanted = {n.node_id for n in self.list_all_nodes()}
        deadline = time.monotonic() + timeout
        while True:
            alive_ids = {n["NodeID"] for n in api.nodes() if n["Alive"]}
            if alive_ids == wanted:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out waiting for the cluster's {len(wanted)} nodes "
                    f"({len(alive_ids)} alive)"
                )
            time.sleep(0.1)

    def shutdown(self) -> None:
        """Disconnects this driver if it joined, then stops every node, the head last."""
        from sdk import api

        if self._connected:
            api.shutdown()
            self._connected = False
        for node in list(reversed(self.list_all_nodes())):
            self.remove_node(node)


def _start_args(node_args: dict[str, Any]) -> list[str]:
    given = dict(node_args)
    args: list[str] = []
    for key, flag in (("num_cpus", "--num-cpus"), ("num_gpus", "--num-gpus")):
        if given.get(key) is not None:
            args += [flag, str(given.pop(key))]
        given.pop(key, None)
    if given.get("object_store_memory") is not None:
        args += ["--object-store-memory", str(int(given.pop("object_store_memory")))]
    if given.get("_memory") is not None:
        args += ["--memory", str(int(given.pop("_memory")))]
    for key, flag in (("resources", "--resources"), ("labels", "--labels")):
        if given.get(key):
            args += [flag, json.dumps(given.pop(key))]
        given.pop(key, None)
    given.pop("object_store_memory", None)
    given.pop("_memory", None)
    ignored = sorted(name for name in given if name in IGNORED_INIT_ARGS)
    if ignored:  # (as init() takes them: Ray's settings that change nothing here)
        warnings.warn(
            f"Cluster.add_node(): {', '.join(ignored)} have no effect in Cairn",
            stacklevel=3,
        )
        given = {k: v for k, v in given.items() if k not in IGNORED_INIT_ARGS}
    if given:
        raise ValueError(
            f"Cluster.add_node(): {', '.join(sorted(given))} not supported by Cairn (it takes "
            "num_cpus, num_gpus, resources, labels, object_store_memory and _memory)"
        )
    return args
