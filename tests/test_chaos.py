"""Chaos: a seeded map-reduce job (thousands of tasks and an actor) runs on a
three-node cluster while a killer SIGKILLs random workers, worker nodes (each
replaced by a fresh node, as an operator would), worker node daemons alone (started
again by their node) and the global scheduler every couple of seconds. The result
equals the fault-free one, and afterwards every live node has all its resources back.
The seed is printed; set ``CAIRN_CHAOS_SEED`` to replay a run's choices."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from processes import pids_with, run_cairn

import sdk as ray
from controlplane import local_node
from controlplane.node import rpc

pytestmark = pytest.mark.timeout(420)
MAPS, PER_REDUCE, WIDTH = 3000, 20, 20_000  # 160 KB per map output: in segments


def _cairn(*args: str) -> None:
    run_cairn(*args)


@pytest.fixture
def cluster() -> Iterator[str]:
    if local_node.local_nodes():
        pytest.fail("Cairn nodes are already running on this machine; `cairn stop` them")
    _cairn("start", "--head", "--port", "0", "--num-cpus", "1")
    try:
        head = local_node.running_head()
        assert head is not None and head.address is not None
        for _ in range(2):
            _cairn("start", "--address", head.address, "--num-cpus", "2")
        ray.init(address="auto")
        try:
            yield head.address
        finally:
            ray.shutdown()
    finally:
        _cairn("stop")


@ray.remote(num_cpus=1, max_retries=-1)
def mapper(i: int) -> np.ndarray:
    time.sleep(0.01)
    return np.random.default_rng(i).integers(0, 1000, WIDTH)


@ray.remote(num_cpus=1, max_retries=-1)
def reducer(*parts: np.ndarray) -> int:
    return int(sum(int(part.sum()) for part in parts))


@ray.remote(max_restarts=-1, max_task_retries=-1)
class Scale:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def apply(self, value: int) -> int:
        return value * self.factor


def _expected() -> int:
    return 3 * sum(
        int(np.random.default_rng(i).integers(0, 1000, WIDTH).sum()) for i in range(MAPS)
    )


class Killer(threading.Thread):
    def __init__(self, seed: int, head_address: str) -> None:
        super().__init__(daemon=True)
        self.rng = random.Random(seed)
        self.head_address = head_address
        self.stop = threading.Event()
        self.kills: list[str] = []

    def run(self) -> None:
        while not self.stop.wait(self.rng.uniform(1.5, 3.0)):
            kind = self.rng.choice(["worker", "worker", "node", "daemon", "scheduler"])
            self.kills.append(getattr(self, f"_kill_{kind}")())
            print(f"chaos: {self.kills[-1]}", flush=True)

    def _kill_worker(self) -> str:
        pids = sorted(pids_with("dataplane.worker"))
        if not pids:
            return "worker: none running"
        victim = self.rng.choice(pids)
        os.kill(victim, signal.SIGKILL)
        return f"worker {victim}"

    def _kill_node(self) -> str:
        nodes = sorted(
            (n for n in local_node.local_nodes() if not n.head and n.running), key=lambda n: n.pid
        )
        if not nodes:
            return "node: none running"
        victim = self.rng.choice(nodes)
        os.killpg(os.getpgid(victim.pid), signal.SIGKILL)
        _cairn("start", "--address", self.head_address, "--num-cpus", "2")  # its replacement
        return f"node {victim.pid} (replaced)"

    def _kill_daemon(self) -> str:
        """A worker node's daemon alone: its node process starts a new one."""
        nodes = sorted(
            (n for n in local_node.local_nodes() if not n.head and n.running), key=lambda n: n.pid
        )
        daemons = [p for n in nodes for p in pids_with("controlplane.node", str(n.session_dir))]
        if not daemons:
            return "daemon: none running"
        victim = self.rng.choice(sorted(daemons))
        os.kill(victim, signal.SIGKILL)
        return f"node daemon {victim} (restarted by its node)"

    def _kill_scheduler(self) -> str:
        pids = sorted(pids_with("controlplane.scheduler"))
        if not pids:
            return "scheduler: none running"
        victim = self.rng.choice(pids)
        os.kill(victim, signal.SIGKILL)
        return f"scheduler {victim}"


def test_a_map_reduce_job_survives_random_kills(cluster: str) -> None:
    seed = int(os.environ.get("CAIRN_CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    print(f"chaos seed {seed} (CAIRN_CHAOS_SEED={seed} replays the killer's choices)")
    killer = Killer(seed, cluster)
    killer.start()
    try:
        maps = [mapper.remote(i) for i in range(MAPS)]
        reduces = [reducer.remote(*maps[j : j + PER_REDUCE]) for j in range(0, MAPS, PER_REDUCE)]
        del maps
        scale = Scale.remote(3)
        scaled = [scale.apply.remote(ref) for ref in reduces]
        result = sum(ray.get(scaled, timeout=300))
    finally:
        killer.stop.set()
        killer.join(60)
    assert killer.kills, f"seed {seed}: the job ended before anything was killed"
    assert result == _expected(), f"seed {seed}: kills {killer.kills}"

    deadline = time.monotonic() + 30
    while True:  # every live node has all its resources back (nothing leaked)
        leaks: dict[str, object] = {}
        for node in local_node.local_nodes():
            if node.running and node.address:
                try:
                    info = rpc.call(node.address, "Info", {}, timeout=10)
                except ConnectionError as exc:  # a daemon being started again
                    leaks[node.address] = str(exc)
                    continue
                if info["available"] != info["total"]:
                    leaks[node.address] = (info["available"], info["total"])
        if not leaks:
            break
        assert time.monotonic() < deadline, f"seed {seed}: resources not given back: {leaks}"
        time.sleep(0.2)
