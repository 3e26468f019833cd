"""A cluster of ``cairn start`` nodes on this machine (each its own process group and
store, all on loopback), for the tests of several nodes that need no network
namespaces: a head, then nodes joined to it; stopped (``cairn stop``) after."""

from __future__ import annotations

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
    for each of ``nodes``."""
    if local_node.local_nodes():
        pytest.fail("Cairn nodes are already running on this machine; `cairn stop` them")
    run_cairn("start", "--head", "--port", "0", *head)
    try:
        record = local_node.running_head()
        assert record is not None and record.address is not None
        joined: list[local_node.NodeRecord] = []
        for args in nodes:
            before = {n.pid for n in local_node.local_nodes()}
            run_cairn("start", "--address", record.address, *args)
            joined += [n for n in local_node.local_nodes() if n.pid not in before]
        yield MachineCluster(record, joined)
    finally:
        run_cairn("stop")
