"""Cluster figures on this machine: task throughput on 1, 2 and 4 nodes, spill-over
latency, and cross-node object transfer beside a raw socket copy of the same bytes.

    .venv/bin/python bench/cluster.py [--tasks 2000] [--transfer-mb 500] [--compare-auth]
    .venv/bin/python bench/cluster.py --compare-tls [--rounds 3] [--transfer-mb 500]

Each node is a real `cairn start` process group with its own store (2 CPUs each); the
tasks sleep 10 ms, so the cores are not the limit: what is measured is how fast the
local and global schedulers, through the log, keep the nodes busy. With
``--compare-auth`` the two-node rows run again on a cluster started with
``--disable-auth``: what the cluster token costs the calls between nodes (the only calls
it guards; a private ``sdk.init()`` cluster has no gRPC service at all).

``--compare-tls`` runs only the two-node rows (spill-over latency, object transfer),
on a cluster started with ``--tls on`` and one with ``--tls off``, alternating for
``--rounds`` rounds, and prints each side's best and their ratio: what TLS costs the
links between nodes (on loopback: the cryptography, not the network).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import sdk as ray  # noqa: E402
from controlplane import local_node  # noqa: E402
from sdk.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402


def cairn(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "controlplane.cli", *args],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        timeout=300,
    )


def start_cluster(nodes: int, auth: bool = True, tls: str = "auto") -> None:
    without = ([] if auth else ["--disable-auth"]) + ["--tls", tls]
    cairn("start", "--head", "--port", "0", "--num-cpus", "2", *without)
    head = local_node.running_head()
    assert head is not None and head.address is not None
    for _ in range(nodes - 1):
        cairn("start", "--address", head.address, "--num-cpus", "2", *without)


def two_node_rows(transfer_mb: int, label: str = "") -> list[tuple[str, float, str]]:
    spilled = noop_here.options(scheduling_strategy=other_node())
    return [
        (f"latency, task on the driver's node{label}", latency_ms(noop_here), "ms"),
        (f"latency, task spilled to another node{label}", latency_ms(spilled), "ms"),
        (
            f"object transfer between nodes ({transfer_mb} MB){label}",
            transfer_gbps(transfer_mb),
            "GB/s",
        ),
    ]


@ray.remote(num_cpus=1)
def sleep_10ms() -> int:
    time.sleep(0.01)
    return 1


@ray.remote(num_cpus=1)
def noop_here() -> int:
    return 1


@ray.remote(num_cpus=1)
def size_of(array: np.ndarray) -> int:
    return int(array.nbytes)


def throughput(tasks: int) -> float:
    ray.get([sleep_10ms.remote() for _ in range(200)])  # warm the workers up
    start = time.perf_counter()
    assert sum(ray.get([sleep_10ms.remote() for _ in range(tasks)])) == tasks
    return tasks / (time.perf_counter() - start)


def latency_ms(fn: Any, rounds: int = 50) -> float:
    """Median seconds from submitting a no-op task to having its result, in ms."""
    ray.get(fn.remote())
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        ray.get(fn.remote())
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2] * 1000


def other_node() -> NodeAffinitySchedulingStrategy:
    """A hard affinity to a node other than the driver's."""
    here = ray.get_runtime_context().get_node_id()
    for record in local_node.local_nodes():
        node_id = (record.session_dir / "node.ready").read_text()
        if node_id != here:
            return NodeAffinitySchedulingStrategy(node_id, soft=False)
    raise RuntimeError("no other node")


def transfer_gbps(megabytes: int) -> float:
    """A driver-made object sent to a task pinned to another node: the pull of its
    bytes, in 1 MiB chunks, plus one spill round trip."""
    elsewhere = size_of.options(scheduling_strategy=other_node())
    ray.get(elsewhere.remote(ray.put(np.ones(1 << 20, dtype=np.uint8))))  # warm up
    array = np.ones(megabytes * 1024 * 1024, dtype=np.uint8)
    ref = ray.put(array)
    start = time.perf_counter()
    assert ray.get(elsewhere.remote(ref)) == array.nbytes
    return array.nbytes / (time.perf_counter() - start) / 1e9


def raw_socket_gbps(megabytes: int) -> float:
    """The same bytes through one loopback TCP connection, in 1 MiB writes and reads."""
    data = memoryview(np.ones(megabytes * 1024 * 1024, dtype=np.uint8).data)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = bytearray(len(data))

    def receive() -> None:
        conn, _ = server.accept()
        view, got = memoryview(received), 0
        while got < len(received):
            got += conn.recv_into(view[got:], min(1 << 20, len(received) - got))
        conn.close()

    reader = threading.Thread(target=receive)
    reader.start()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as client:
        for offset in range(0, len(data), 1 << 20):
            client.sendall(data[offset : offset + (1 << 20)])
    reader.join()
    elapsed = time.perf_counter() - start
    server.close()
    return len(data) / elapsed / 1e9


def compare_tls(rounds: int, transfer_mb: int) -> None:
    """The two-node rows with TLS on and off, alternating; best of each, and on/off."""
    best: dict[tuple[str, str], float] = {}
    units: dict[str, str] = {}
    for _ in range(rounds):
        for mode in ("on", "off"):
            start_cluster(2, tls=mode)
            try:
                ray.init(address="auto")
                for name, value, unit in two_node_rows(transfer_mb):
                    units[name] = unit
                    better = min if unit == "ms" else max
                    best[(name, mode)] = better(best.get((name, mode), value), value)
            finally:
                ray.shutdown()
                cairn("stop")
    print(f"{'row (best of ' + str(rounds) + ')':52s} {'TLS on':>10s} {'TLS off':>10s}  ratio")
    for name, unit in units.items():
        on, off = best[(name, "on")], best[(name, "off")]
        print(f"{name:52s} {on:10,.2f} {off:10,.2f}  {on / off:5.2f}  {unit}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--transfer-mb", type=int, default=500)
    parser.add_argument(
        "--compare-auth",
        action="store_true",
        help="run the two-node rows again with --disable-auth",
    )
    parser.add_argument(
        "--compare-tls",
        action="store_true",
        help="only the two-node rows, with --tls on against --tls off",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --compare-tls")
    args = parser.parse_args()
    if local_node.local_nodes():
        print("Cairn nodes are running here already: `cairn stop` them first")
        return 1
    print(f"machine: {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}")
    if args.compare_tls:
        compare_tls(args.rounds, args.transfer_mb)
        return 0
    rows: list[tuple[str, float, str]] = []
    runs = [(1, True), (2, True), (4, True)] + ([(2, False)] if args.compare_auth else [])
    for nodes, auth in runs:
        start_cluster(nodes, auth)
        try:
            ray.init(address="auto")
            label = "" if auth else ", auth disabled"
            rate = throughput(args.tasks)
            rows.append((f"tasks of 10 ms, {nodes} node(s) x 2 CPUs{label}", rate, "tasks/s"))
            if nodes == 2:
                mb = args.transfer_mb
                rows += two_node_rows(mb, label)
                if auth:
                    rows.append(
                        (f"raw loopback socket copy ({mb} MB)", raw_socket_gbps(mb), "GB/s")
                    )
        finally:
            ray.shutdown()
            cairn("stop")
    for name, value, unit in rows:
        print(f"{name:52s} {value:10,.2f}  {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
