"""A cluster of ``cairn start`` nodes on this machine (each its own process group and
store, all on loopback), for the tests of several nodes that need no network
namespaces: a head, then nodes joined to it; stopped (``cairn stop``) after."""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from processes import run_cairn

from controlplane import local_node


@dataclass(frozen=True)
class MachineCluster:
    head: local_node.NodeRecord
    joined: list[local_node.NodeRecord]  # in the order they were started

    @property
    def address(self) -> str:
        assert self.head.address is not None
        return self.head.address


def node_id(record: local_node.NodeRecord) -> str:
    """The id of the node a record's process runs now."""
    return (record.session_dir / "node.ready").read_text()


@contextlib.contextmanager
def machine_cluster(head: Sequence[str], *nodes: Sequence[str]) -> Iterator[MachineCluster]:
    """``cairn start --head --port 0 *head``, then ``cairn start --address HEAD *args``
    for each of ``nodes``, all at once (``joined``: in the order of ``nodes``)."""
    if local_node.local_nodes():
        pytest.fail("Cairn nodes are already running on this machine; `cairn stop` them")
    run_cairn("start", "--head", "--port", "0", *head)
    try:
        record = local_node.running_head()
        assert record is not None and record.address is not None
        address = record.address
        with concurrent.futures.ThreadPoolExecutor(max(1, len(nodes))) as pool:  # all at once
            said = list(
                pool.map(lambda args: run_cairn("start", "--address", address, *args), nodes)
            )
        records = local_node.local_nodes()
        joined = [  # each by its output's file, which its start named (it holds its pid)
            next(n for n in records if f"cairn-node-{n.pid}.log" in started.stdout)
            for started in said
        ]
        yield MachineCluster(record, joined)
    finally:
        run_cairn("stop")
