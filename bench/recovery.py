"""Recovery figures on this machine (issue 6):

* node: a chain of 20 tasks (10 MB outputs, ~50 ms each) runs on a node of its own; the
  node is SIGKILLed; how long until it is declared dead, and until ``get`` has the last
  output again, rebuilt from the log -- as a ratio of the chain's original compute time.
* postgres: a driver runs small tasks back to back while PostgreSQL is SIGKILLed and
  restarted 1 s later on the same port; the longest pause any task saw, beside the 1 s
  the server was down.
* failover: the same with a synchronous streaming replica, the primary SIGKILLed (with
  its backends, as a machine crash) and the replica promoted: by hand 0.5 s later (the
  cluster given both hosts in one URL), and, beside it, by the watchdog of a
  ``Gcs(replicas=1)`` (``cairn start --head --gcs-replicas 1``) with no command typed;
  then on a log on two servers, each with its replica, server 1's primary SIGKILLed
  under a job whose shard lies on server 0, then on server 1; each with the count of
  acknowledged tasks whose events the new primary lacks (0).
* scheduler: the time a global scheduler takes to restart and catch up with a log of
  10^4 to 10^6 events, from its checkpoint and (for comparison) folding the whole log.

    .venv/bin/python bench/recovery.py [--parts node,postgres,failover,scheduler]
                                       [--max-events 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import numpy as np  # noqa: E402

import sdk as ray  # noqa: E402
from controlplane import local_node, schema  # noqa: E402
from controlplane.embedded_postgres import EmbeddedPostgres  # noqa: E402
from controlplane.eventlog import EntityKind, Event, EventAppender  # noqa: E402
from controlplane.eventlog.servers import shard_of  # noqa: E402
from controlplane.gcs import Gcs  # noqa: E402
from controlplane.postgres_processes import server_processes  # noqa: E402
from controlplane.scheduler import GlobalScheduler  # noqa: E402
from sdk.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

MB = 1024 * 1024


def cairn(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "controlplane.cli", *args],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        timeout=300,
    )


@ray.remote(num_cpus=1)
def first(n: int) -> np.ndarray:
    time.sleep(0.05)
    return np.full(10 * MB // 8, n, dtype=np.int64)


@ray.remote(num_cpus=1)
def step(previous: np.ndarray, k: int) -> np.ndarray:
    time.sleep(0.05)
    return previous + k


def node_loss() -> None:
    cairn("start", "--head", "--port", "0", "--num-cpus", "2")
    try:
        head = local_node.running_head()
        assert head is not None and head.address is not None
        cairn("start", "--address", head.address, "--num-cpus", "2")
        (victim,) = [n for n in local_node.local_nodes() if not n.head]
        victim_id = (victim.session_dir / "node.ready").read_text()
        ray.init(address="auto")
        try:
            there = NodeAffinitySchedulingStrategy(victim_id, soft=True)
            started = time.perf_counter()
            ref = first.options(scheduling_strategy=there).remote(0)
            for k in range(1, 20):
                ref = step.options(scheduling_strategy=there).remote(ref, k)
            ray.wait([ref], timeout=300)
            compute = time.perf_counter() - started
            url = ray.get_runtime_context().gcs_address
            killed = time.perf_counter()
            os.killpg(os.getpgid(victim.pid), signal.SIGKILL)
            detected = threading.Event()
            detect_s: list[float] = []

            def watch() -> None:
                while not asyncio.run(_node_dead(url, victim_id)):
                    time.sleep(0.02)
                detect_s.append(time.perf_counter() - killed)
                detected.set()

            threading.Thread(target=watch, daemon=True).start()
            value = ray.get(ref, timeout=300)
            recovered = time.perf_counter() - killed
            assert int(value[0]) == sum(range(20))
            detected.wait(60)
            print("node loss (20-task chain, 10 MB outputs, 50 ms each, on a node of its own)")
            print(f"  original compute time:     {compute:7.2f} s")
            print(f"  kill -> declared dead:     {detect_s[0]:7.2f} s")
            print(f"  kill -> value rebuilt:     {recovered:7.2f} s")
            print(
                f"  rebuild / compute:         {(recovered - detect_s[0]) / compute:7.2f}x "
                "(after detection)"
            )
        finally:
            ray.shutdown()
    finally:
        cairn("stop")


async def _node_dead(url: str, node_id: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM events WHERE entity_id = $1 AND event_type = 'dead'",
                node_id,
            )
        )
    finally:
        await conn.close()


@ray.remote
def tiny(i: int) -> int:
    return i


class _BackToBack:
    """A driver thread running tiny tasks back to back; each completion's time and task
    id (a result is seen only once its ``finished`` event is durable: acknowledged)."""

    def __init__(self) -> None:
        self.done: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drive)

    def _drive(self) -> None:
        i = 0
        while not self._stop.is_set():
            ref = tiny.remote(i)
            assert ray.get(ref, timeout=120) == i
            self.done.append((time.perf_counter(), ref.task_id().hex()))
            i += 1

    def start(self) -> _BackToBack:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def figures(self, url: str) -> dict[str, float]:
        """The longest pause, the median gap, the count, and how many acknowledged tasks
        lack their ``finished`` event in the log at ``url`` (must be 0)."""
        gaps = [b - a for (a, _), (b, _) in itertools.pairwise(self.done)]
        acked = [task_id for _, task_id in self.done]
        finished = asyncio.run(_finished(url, acked))
        return {
            "pause": max(gaps),
            "median_ms": sorted(gaps)[len(gaps) // 2] * 1000,
            "tasks": len(self.done),
            "lost": len(set(acked) - finished),
        }


async def _finished(url: str, task_ids: list[str]) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT DISTINCT entity_id FROM log_union.events WHERE entity_kind = 'task' "
            "AND event_type = 'finished' AND entity_id = ANY($1::text[])",
            task_ids,
        )
    finally:
        await conn.close()
    return {row["entity_id"] for row in rows}


def _crash(pid: int) -> None:
    """SIGKILL of a PostgreSQL server and its backends at once, as a machine crash."""
    for each in server_processes(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)


def postgres_restart(down_s: float = 1.0) -> None:
    """Tasks back to back while the server is SIGKILLed and, ``down_s`` later, restarted
    on its port."""
    server = EmbeddedPostgres()
    url = server.start()
    try:
        ray.init(num_cpus=2, gcs_url=url)
        driver = _BackToBack().start()
        time.sleep(2.0)
        killed = time.perf_counter()
        server.kill()
        time.sleep(down_s)
        server.start()
        restarted = time.perf_counter()
        time.sleep(3.0)
        driver.stop()
        figures = driver.figures(url)
        print("PostgreSQL SIGKILL + restart on the same port, tasks back to back")
        print(f"  no server for:             {restarted - killed:7.2f} s")
        print(
            f"  longest pause a task saw:  {figures['pause']:7.2f} s "
            f"(median gap {figures['median_ms']:.2f} ms)"
        )
        print(f"  tasks completed:           {figures['tasks']:7d}")
        print(f"  acknowledged tasks lost:   {figures['lost']:7d}")
    finally:
        ray.shutdown()
        server.stop()


def _failover_by_hand(promote_after_s: float) -> dict[str, float]:
    """The primary SIGKILLed, its synchronous replica promoted ``promote_after_s`` later
    by hand (``EmbeddedPostgres.promote()``), the cluster given both in one URL."""
    server = EmbeddedPostgres()
    server.start()
    replica = None
    try:
        schema.upgrade(server.url)
        replica = server.start_replica()
        password = server.url.split("@")[0].rsplit(":", 1)[1]
        url = (
            f"postgresql://cairn:{password}@127.0.0.1:{server.port},"
            f"127.0.0.1:{replica.port}/cairn?target_session_attrs=read-write"
        )
        ray.init(num_cpus=2, gcs_url=url)
        driver = _BackToBack().start()
        time.sleep(2.0)
        killed = time.perf_counter()
        _crash(server.pid or 0)
        time.sleep(promote_after_s)
        replica.promote()
        promoted = time.perf_counter()
        time.sleep(3.0)
        driver.stop()
        return {"primary_gone": promoted - killed, **driver.figures(url)}
    finally:
        ray.shutdown()
        if replica is not None:
            replica.stop()
        server.stop()


def _failover_by_watchdog(job_on_server: int | None = None) -> dict[str, float]:
    """The primary of a ``Gcs(replicas=1)`` (what ``cairn start --head --gcs-replicas 1``
    runs) SIGKILLed; its watchdog promotes the replica, no command typed. With
    ``job_on_server``: a log on two servers, each with its replica (``--log-servers 2
    --log-shards 2``), the driver's job in a shard of that server, and server 1's
    primary SIGKILLed."""
    servers = 1 if job_on_server is None else 2
    gcs = Gcs(replicas=1, log_servers=servers, log_shards=servers, on_event=lambda _: None)
    gcs.start()
    try:
        ray.init(num_cpus=2, gcs_url=gcs.url)
        while job_on_server is not None and job_on_server != shard_of(
            ray.get_runtime_context().get_job_id(), servers
        ):  # (another job, until its shard is on that server)
            ray.shutdown()
            ray.init(num_cpus=2, gcs_url=gcs.url)
        driver = _BackToBack().start()
        time.sleep(2.0)
        watchdog = gcs.watchdog if servers == 1 else gcs.other_watchdogs[0]
        assert watchdog is not None
        killed = time.monotonic()  # the watchdog's clock
        _crash((gcs.servers[0] if servers == 1 else gcs.other_log_servers[0]).pid or 0)
        assert watchdog.promoted.wait(60), "the watchdog did not promote the replica"
        assert watchdog.promoted_at is not None  # when pg_promote returned
        time.sleep(3.0)
        driver.stop()
        return {"primary_gone": watchdog.promoted_at - killed, **driver.figures(gcs.url)}
    finally:
        ray.shutdown()
        gcs.stop()


def failover(promote_after_s: float = 0.5) -> None:
    """The failovers in one run, side by side: by hand and by the watchdog on a log on
    one server; on a log on two, server 1's primary lost under a job whose shard is on
    server 0, then under one whose shard is on server 1."""
    columns = [
        (f"by hand ({promote_after_s:g} s)", _failover_by_hand(promote_after_s)),
        ("watchdog", _failover_by_watchdog()),
        ("2 srv, job on 0", _failover_by_watchdog(job_on_server=0)),
        ("2 srv, job on 1", _failover_by_watchdog(job_on_server=1)),
    ]
    print(
        "PostgreSQL SIGKILL of the primary + its synchronous replica promoted, tasks back to back"
    )
    print(f"  {'':30}" + "".join(f"{name:>17}" for name, _ in columns))
    rows = [
        ("no primary for:", "primary_gone", "{:.2f} s"),
        ("longest pause a task saw:", "pause", "{:.2f} s"),
        ("median gap between tasks:", "median_ms", "{:.2f} ms"),
        ("tasks completed:", "tasks", "{:d}"),
        ("acknowledged tasks lost:", "lost", "{:d}"),
    ]
    for label, key, form in rows:
        print(f"  {label:30}" + "".join(f"{form.format(got[key]):>17}" for _, got in columns))


async def _fill(url: str, events: int, have: int) -> None:
    """Appends synthetic history: tasks spilled, placed and finished on two nodes."""
    async with EventAppender(url) as appender:
        if have == 0:
            for node in ("node-a", "node-b"):
                await appender.append(
                    Event(
                        EntityKind.NODE,
                        node,
                        "registered",
                        {"address": f"{node}:1", "resources": {"CPU": 8.0}},
                        node_id=node,
                    )
                )
        batch: list[Event] = []
        n = have
        while n < events:
            task = f"t{n}"
            batch += [
                Event(
                    EntityKind.TASK,
                    task,
                    "spilled",
                    {"attempt": 0, "resources": {"CPU": 1}, "args": {}, "from_node": "node-a"},
                ),
                Event(EntityKind.TASK, task, "placed", {"node_id": "node-b", "attempt": 0}),
                Event(EntityKind.TASK, task, "finished", {"attempt": 0}),
            ]
            n += 3
            if len(batch) >= 3000:
                await appender.append_many(batch)
                batch = []
        if batch:
            await appender.append_many(batch)


async def _restart_time(url: str) -> float:
    scheduler = GlobalScheduler(url)
    started = time.perf_counter()
    running = asyncio.create_task(scheduler.run())
    await asyncio.wait_for(scheduler.following.wait(), 600)
    elapsed = time.perf_counter() - started
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    return elapsed


async def scheduler_restart(max_events: int) -> None:
    server = EmbeddedPostgres()
    url = server.start()
    try:
        schema.upgrade(url)
        print("global scheduler restart (start -> caught up with the log's head)")
        print(f"  {'events':>9}  {'from checkpoint':>15}  {'whole log':>10}")
        have = 0
        sizes = [10**k for k in range(4, 8) if 10**k <= max_events]
        for size in sizes:
            await _fill(url, size, have)
            have = size
            await _restart_time(url)  # a first run saves checkpoints as it goes
            from_checkpoint = await _restart_time(url)
            conn = await asyncpg.connect(url)
            try:
                await conn.execute("DELETE FROM checkpoints")
            finally:
                await conn.close()
            whole = await _restart_time(url)
            print(f"  {size:>9,}  {from_checkpoint:>13.3f} s  {whole:>8.3f} s")
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="node,postgres,failover,scheduler")
    parser.add_argument("--max-events", type=int, default=1_000_000)
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "node" in parts:
        node_loss()
    if "postgres" in parts:
        postgres_restart()
    if "failover" in parts:
        failover()
    if "scheduler" in parts:
        asyncio.run(scheduler_restart(args.max_events))
    return 0


if __name__ == "__main__":
    sys.exit(main())
