"""The driver's runtime: its connection to a node daemon, and the head node it started
if it started one (``init()`` without an address). ``sdk.shutdown`` and interpreter exit
stop what it started; a driver connected to a running cluster only disconnects."""

from __future__ import annotations

import atexit

from controlplane.local_node import LocalNode, NodeConfig, find_running
from dataplane import context
from dataplane.client import CoreClient


class Runtime:
    def __init__(self, client: CoreClient, head: LocalNode | None) -> None:
        self.client = client
        self.head = head
        atexit.register(self.shutdown)

    @classmethod
    def start(cls, *, gcs_url: str | None, config: NodeConfig, namespace: str | None) -> Runtime:
        """Starts a private head node and connects to it."""
        head = LocalNode.start(gcs_url=gcs_url, config=config)
        try:
            client = CoreClient(head.socket_path, "driver", namespace=namespace)
        except BaseException:
            head.stop()
            raise
        context.set_client(client)
        return cls(client, head)

    @classmethod
    def connect(cls, *, address: str | None, namespace: str | None) -> Runtime:
        """Connects to a running cluster through its node on this machine: the one of
        the cluster whose head is at ``address``, or this machine's head."""
        session_dir = find_running(address)
        client = CoreClient(str(session_dir / "node.sock"), "driver", namespace=namespace)
        context.set_client(client)
        return cls(client, None)

    def shutdown(self) -> None:
        atexit.unregister(self.shutdown)
        if context.current_client() is self.client:
            context.set_client(None)
        self.client.close()
        if self.head is not None:
            self.head.stop()
