"""Chaos on three hosts that share only a network link (tests/hosts.py): a map-reduce
job (waves of a thousand tasks, scaled by an actor) runs from a driver on host1 while a
seeded killer in the test process injects every kind of fault into the hosts' processes
and links. The head runs on host0 (embedded PostgreSQL, TLS between hosts), nodes on
host1 and host2. The kinds:

* ``worker``: SIGKILL of a random worker process, on any host (the actor's included);
* ``node``: SIGKILL of host2's whole node (its ``cairn start`` process group), then a
  replacement node started on host2, as an operator would;
* ``daemon``: SIGKILL of host2's node daemon alone; its node starts a new one, which
  joins under a new id;
* ``scheduler``: SIGKILL of the global scheduler; the head starts a new one;
* ``head-daemon``: SIGKILL of the head's node daemon alone (the daemon that serves the
  Join service and runs the membership monitor); the head starts a new one, which
  joins under a new id and declares the old one dead;
* ``postgres``: a crash of the embedded PostgreSQL (SIGKILL of the postmaster and every
  backend at once), then, after 0.5 to 2 s, the same server started again (binary,
  user, data, port and settings). The head notices, and leaves a killed server to
  whoever killed it (it restarts one that stopped by itself): the test does what an
  operator, or a service manager, would;
* ``partition``: a random host cut from the network (``link_down``) for 1 to 2 s, well
  under the head's death timeout (``$CAIRN_NODE_DEAD_AFTER_S``, 6 s here, with TCP's
  retransmission back-off), then plugged back in: nobody may die of it;
* ``partition-dead``: host2 cut off for 8 to 9 s, longer than the death timeout: the
  head declares its node dead, and its work is done again elsewhere; back on the
  network, fenced, the node's daemon stops and the node starts a new one, which joins
  under a new id.

Faults come every 1 to 2.5 s, in rounds: each round is every kind once, in an order
drawn from the seed, until every kind was injected at least once (at most 3 rounds; an
attempt that found nothing to hit is logged as such and does not count); then the
driver finishes the wave it is in. What must hold: every kind was injected; the driver
saw no error and every wave's result equals the fault-free one (computed here with
numpy); afterwards each host runs exactly one live node, every live node has all its
resources back, and the dead nodes are what the faults killed (at most one head per
head-daemon fault, at least one if there was one; none on host1, whose only faults
are short partitions); and nothing is left of the hosts (the fixture removes them).

Daemons are killed whatever they are doing, while they start included, and PostgreSQL
crashes whenever its turn comes, while a node recovers included: a daemon that dies
while it starts is one more death of its node, which starts another, and a daemon that
starts, or a lost object whose lineage is read, while PostgreSQL is down waits for it.
What is not injected: more than 2 daemon deaths of one node in 70 s (a node starts at
most 3 new daemons a minute and stops at the 4th death, by design).

CI runs the seeds of ``$CAIRN_CHAOS_SEEDS`` (default ``1,2``), one test each; the seed
and the log of what was injected are printed, and ``CAIRN_CHAOS_SEEDS=<seed>`` replays
its schedule (the kinds' order, the gaps, which links are cut and for how long; not the
job's timing around them, nor which of the processes running then is hit).
``$CAIRN_CHAOS_KINDS`` narrows the kinds, to study one."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pytest
from host_cluster import HostCluster, running
from hosts import PYTHON, Host, Hosts, require_root

from controlplane import auth
from controlplane.membership import DEAD_AFTER_ENV_VAR

pytestmark = pytest.mark.timeout(420)

ALL_KINDS = (
    "worker",
    "node",
    "daemon",
    "scheduler",
    "head-daemon",
    "postgres",
    "partition",
    "partition-dead",
)
KINDS = tuple(os.environ.get("CAIRN_CHAOS_KINDS", ",".join(ALL_KINDS)).split(","))
assert set(KINDS) <= set(ALL_KINDS), f"unknown fault kinds: {set(KINDS) - set(ALL_KINDS)}"
SEEDS = [int(s) for s in os.environ.get("CAIRN_CHAOS_SEEDS", "1,2").split(",") if s.strip()]
MAX_ROUNDS = 3
DEAD_AFTER_S = 6.0
MAPS, PER_REDUCE, WIDTH, FACTOR = 1000, 20, 20_000, 3  # 160 KB per map output

# The job, run as a driver on host1: waves of map-reduce (each wave's maps seeded by the
# wave and the map's index) scaled by an actor, until a line comes on stdin; prints
# READY once connected, each wave's result as it comes, and the list of them last.
DRIVER = f"""
import json, select, sys, time
import numpy as np
import sdk as ray

ray.init(address="auto")

@ray.remote(num_cpus=1, max_retries=-1)
def mapper(wave, i):
    time.sleep(0.01)
    return np.random.default_rng([wave, i]).integers(0, 1000, {WIDTH})

@ray.remote(num_cpus=1, max_retries=-1)
def reducer(*parts):
    return int(sum(int(part.sum()) for part in parts))

@ray.remote(max_restarts=-1, max_task_retries=-1)
class Scale:
    def __init__(self, factor):
        self.factor = factor
    def apply(self, value):
        return value * self.factor

scale = Scale.remote({FACTOR})
print("READY", flush=True)
results = []
while True:
    wave = len(results)
    maps = [mapper.remote(wave, i) for i in range({MAPS})]
    reduces = [reducer.remote(*maps[j : j + {PER_REDUCE}]) for j in range(0, {MAPS}, {PER_REDUCE})]
    del maps
    results.append(sum(ray.get([scale.apply.remote(r) for r in reduces], timeout=180)))
    print("WAVE", wave, results[-1], flush=True)
    if select.select([sys.stdin], [], [], 0)[0]:
        break
print(json.dumps(results), flush=True)
ray.shutdown()
"""

# Run on host1 once the job is done: waits until every host runs one live node and every
# live node has all its resources back (asked of each node's own service, over TLS), or
# the deadline (argv[1] seconds); prints what it saw last, and the dead nodes.
SETTLED = """
import json, sys, time
import sdk as ray
from controlplane import local_node, tls
from controlplane.node import rpc

ray.init(address="auto")
mine = tls.NodeTls.find(local_node.find_running())
deadline = time.monotonic() + float(sys.argv[1])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    seen = {"hosts": sorted(n["NodeManagerHostname"] for n in alive), "leaks": {}}
    for node in alive:
        address = f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
        try:
            info = rpc.call(address, "Info", {}, 10, secure=mine)
        except Exception as exc:  # a daemon not declared dead yet, or starting
            seen["leaks"][address] = repr(exc)[:300]
            continue
        if info["available"] != info["total"]:
            seen["leaks"][address] = [info["available"], info["total"]]
    if (seen["hosts"] == ["host0", "host1", "host2"] and not seen["leaks"]) or (
        time.monotonic() > deadline
    ):
        break
    time.sleep(0.2)
seen["dead"] = sorted(
    (n["NodeManagerHostname"], n["DeathReasonMessage"]) for n in ray.nodes() if not n["Alive"]
)
print(json.dumps(seen), flush=True)
ray.shutdown()
"""


def _expected(wave: int) -> int:
    return FACTOR * sum(
        int(np.random.default_rng([wave, i]).integers(0, 1000, WIDTH).sum()) for i in range(MAPS)
    )


# -- the hosts' processes, seen from the test process ----------------------------------


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name ([] once it is reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie, not yet reaped by its parent, has)."""
    fields = _stat(pid)
    return not fields or fields[0] in ("Z", "X")


def _real_id(pid: int, which: str) -> int:
    """The real ``Uid`` or ``Gid`` of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{which}:"):
            return int(line.split()[1])
    raise LookupError(f"no {which} for {pid}")


def _processes(host: Host, *needles: str) -> list[int]:
    """The pids of ``host``'s processes whose argv holds every one of ``needles``."""
    return sorted(pid for pid in host.pids() if all(n in _argv(pid) for n in needles))


def _node_processes(host: Host) -> list[int]:
    """The ``cairn start --block`` processes (run_node) of ``host``: its node's."""
    return _processes(host, "controlplane.cli", "start", "--block")


def _daemons(host: Host) -> list[int]:
    return _processes(host, "controlplane.node")


def _in_host(host: Host, path: str | Path) -> Path:
    """``path`` in ``host``'s file system (its private /tmp), as the test process sees
    it: through the root of its holder process."""
    return Path(f"/proc/{host.holder_pid}/root") / str(path).lstrip("/")


def _daemon_ready(host: Host, pid: int) -> bool:
    """Whether the node daemon ``pid`` of ``host`` is ready (its session's node.ready
    names it), i.e. not starting."""
    argv = _argv(pid)
    try:
        session = argv[argv.index("--session-dir") + 1]
        node_id = argv[argv.index("--node-id") + 1]
        return _in_host(host, Path(session) / "node.ready").read_text().strip() == node_id
    except (ValueError, IndexError, OSError):
        return False


def _wait_gone(pids: list[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"{[p for p in pids if not _gone(p)]} did not die"
        time.sleep(0.02)


def _logs(hosts: Hosts, tail: int = 2500) -> str:
    """The end of every node's and PostgreSQL's log in the hosts (for a failure)."""
    parts = []
    for host in hosts:
        tmp = _in_host(host, "/tmp")
        for log in sorted([*tmp.glob("cairn-node-*.log"), *tmp.glob("cairn-session-*/*.log")]):
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace")[-tail:]
                parts.append(f"--- {host.name}:{log.relative_to(tmp.parent)}\n{text}")
    return "\n".join(parts)


def _state(chaos: Chaos) -> str:
    """What the cluster says of itself (for a failure): its nodes, and its unfinished
    tasks by state and node (best effort: the cluster may be in no state to answer)."""
    head = chaos.cluster.head
    try:
        status = head.cairn("status", timeout=30, check=False)
        tasks = head.cairn(
            "sql",
            "SELECT state, node_id, count(*) FROM tasks WHERE state NOT IN "
            "('FINISHED', 'FAILED', 'CANCELLED') GROUP BY 1, 2 ORDER BY 1, 2",
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return f"(the cluster did not say its state: {exc})"
    return f"{status.stdout}{status.stderr}{tasks.stdout}{tasks.stderr}"


# -- the cluster, the killer and the driver ------------------------------------------


@dataclass
class Chaos:
    cluster: HostCluster
    servers: list[subprocess.Popen[bytes]]  # PostgreSQL servers the test started again
    lost_logs: list[str] = field(default_factory=list)  # of nodes killed and replaced

    @property
    def hosts(self) -> Hosts:
        return self.cluster.hosts

    def start_node(self, host: Host, timeout: float = 90.0) -> list[str]:
        """Joins a new node on ``host`` to the head, trying again until ``timeout``
        (the head may be starting a new daemon, or its PostgreSQL be down, right now);
        returns why the tries that failed did."""
        deadline = time.monotonic() + timeout
        failures: list[str] = []
        while True:
            started = host.cairn(
                "start",
                "--address",
                self.cluster.address,
                "--node-ip-address",
                host.ip,
                "--num-cpus",
                "2",
                env={auth.TOKEN_ENV: self.cluster.token},
                check=False,
            )
            if started.returncode == 0:
                return failures
            failures.append((started.stdout + started.stderr).strip()[-300:])
            assert time.monotonic() < deadline, f"no node could start on {host.name}: {failures}"
            time.sleep(1.0)


@pytest.fixture
def chaos() -> Iterator[Chaos]:
    require_root()
    with Hosts(3) as hosts:
        servers: list[subprocess.Popen[bytes]] = []
        try:
            with running(hosts, head_env={DEAD_AFTER_ENV_VAR: str(DEAD_AFTER_S)}) as cluster:
                yield Chaos(cluster, servers)
        finally:
            for server in servers:  # not the head's to stop: the test started them
                with contextlib.suppress(ProcessLookupError):
                    server.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(15)
    for name in hosts.namespaces:  # nothing of the hosts is left
        assert not (Path("/run/netns") / name).exists(), name


@dataclass
class Injection:
    kind: str
    target: str  # what was hit, or why nothing was
    injected: bool  # False: nothing was hit
    at: float  # seconds since the killer started


class Killer(threading.Thread):
    """Injects faults in seeded rounds (every kind once per round, in a drawn order)
    until each kind was injected at least once, or ``MAX_ROUNDS`` rounds are over;
    ``log`` records every attempt."""

    def __init__(self, seed: int, chaos: Chaos) -> None:
        super().__init__(daemon=True, name="chaos-killer")
        self.schedule = random.Random(seed)  # kinds, order, gaps, links, lengths
        self.pick = random.Random(seed + 1)  # victims among what runs at the time
        self.chaos = chaos
        self.hosts = chaos.hosts
        self.log: list[Injection] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._start = time.monotonic()
        self._deaths: dict[int, list[float]] = {}  # node process -> its daemons' deaths
        self.failed_starts = 0  # of replacement nodes (each may leave a dead node)

    @property
    def missing(self) -> list[str]:
        done = {i.kind for i in self.log if i.injected}
        return [kind for kind in KINDS if kind not in done]

    def count(self, *kinds: str) -> int:
        return sum(1 for i in self.log if i.injected and i.kind in kinds)

    def run(self) -> None:
        try:
            for _round in range(MAX_ROUNDS):
                for kind in self.schedule.sample(KINDS, len(KINDS)):
                    gap = self.schedule.uniform(1.0, 2.5)
                    if not self.missing or self.stop.wait(gap):
                        return
                    at = time.monotonic() - self._start
                    target, injected = getattr(self, "_" + kind.replace("-", "_"))()
                    self.log.append(Injection(kind, target, injected, round(at, 1)))
                    print(f"chaos {at:6.1f}s {kind}: {target}", flush=True)
        except BaseException as exc:  # the test reports it
            self.error = exc

    def report(self) -> str:
        return "\n".join(
            f"  {i.at:6.1f}s {i.kind:<14} {i.target}{'' if i.injected else ' (not a fault)'}"
            for i in self.log
        )

    def _kill(self, candidates: list[int], what: str) -> tuple[str, bool]:
        if not candidates:
            return f"nothing to kill: no {what} running", False
        victim = self.pick.choice(candidates)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
        return f"{what} {victim}", True

    def _spared(self, node: int | None) -> bool:
        """Whether node process ``node`` is to be spared the loss of its daemon now (it
        lost 2 in the last 70 s); if not, counts that loss."""
        now = time.monotonic()
        recent = [t for t in self._deaths.get(node or 0, []) if now - t < 70]
        if len(recent) >= 2:
            return True
        self._deaths[node or 0] = [*recent, now]
        return False

    def _kill_daemon(self, host: Host) -> tuple[str, bool]:
        what = f"{'head' if host is self.hosts[0] else 'node'} daemon on {host.name}"
        daemons = _daemons(host)
        if not daemons:
            return f"nothing to kill: no {what} running", False
        if self._spared(_parent(daemons[0])):
            return f"spared: the {what}'s node lost 2 daemons in the last 70 s", False
        starting = "" if _daemon_ready(host, daemons[0]) else " (starting)"
        return self._kill(daemons, what + starting)

    def _worker(self) -> tuple[str, bool]:
        workers = [(h, pid) for h in self.hosts for pid in _processes(h, "dataplane.worker")]
        if not workers:
            return "nothing to kill: no worker running", False
        host, victim = self.pick.choice(workers)
        return self._kill([victim], f"worker on {host.name}")

    def _node(self) -> tuple[str, bool]:
        host = self.hosts[2]
        nodes = _node_processes(host)
        if not nodes:
            return f"nothing to kill: no node running on {host.name}", False
        victim = self.pick.choice(nodes)
        os.killpg(victim, signal.SIGKILL)  # its own session: its daemon and workers too
        _wait_gone([victim])
        with contextlib.suppress(OSError):  # the new node's start removes it
            log = _in_host(host, f"/tmp/cairn-node-{victim}.log").read_text(errors="replace")
            self.chaos.lost_logs.append(f"--- {host.name}: killed node {victim}'s log\n{log}")
        failures = self.chaos.start_node(host)
        self.failed_starts += len(failures)
        return f"node {victim} on {host.name} (replaced{''.join(f'; {f}' for f in failures)})", True

    def _daemon(self) -> tuple[str, bool]:
        return self._kill_daemon(self.hosts[2])

    def _head_daemon(self) -> tuple[str, bool]:
        return self._kill_daemon(self.hosts[0])

    def _scheduler(self) -> tuple[str, bool]:
        return self._kill(_processes(self.hosts[0], "controlplane.scheduler"), "global scheduler")

    def _postgres(self) -> tuple[str, bool]:
        """Crashes the head's PostgreSQL (postmaster and backends at once) and starts it
        again, as itself, after a while down."""
        head = self.hosts[0]
        postmasters = [
            pid
            for pid in head.pids()
            if (argv := _argv(pid)) and argv[0].endswith("/bin/postgres") and "-D" in argv
        ]
        if not postmasters:
            return "nothing to kill: no PostgreSQL running", False
        postmaster = postmasters[0]
        argv = _argv(postmaster)
        uid, gid = _real_id(postmaster, "Uid"), _real_id(postmaster, "Gid")
        backends = [pid for pid in head.pids() if _parent(pid) == postmaster]
        for pid in [postmaster, *backends]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone([postmaster, *backends])
        down = self.schedule.uniform(0.5, 2.0)
        time.sleep(down)  # the outage's length: the scenario
        # the head reaps its server (else PostgreSQL would take the zombie's pid in its
        # lock files for a live server), says so, and leaves a killed one to its killer
        deadline = time.monotonic() + 10
        while Path(f"/proc/{postmaster}").exists():
            assert time.monotonic() < deadline, "the head did not notice its PostgreSQL died"
            time.sleep(0.05)
        data_dir = Path(argv[argv.index("-D") + 1])
        settings = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("/"))
        port, sockets = settings["port"], Path(settings["unix_socket_directories"])
        with open(_in_host(head, data_dir.parent / "postgres.log"), "ab") as log:
            server = head.popen(
                ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.chaos.servers.append(server)
        ready = [str(Path(argv[0]).parent / "pg_isready"), "-q", "-p", port, "-h", str(sockets)]
        deadline = time.monotonic() + 60
        while head.run(ready, check=False).returncode != 0:
            assert server.poll() is None, f"PostgreSQL did not start again:\n{_logs(self.hosts)}"
            assert time.monotonic() < deadline, "PostgreSQL did not accept connections again"
            time.sleep(0.05)
        return f"PostgreSQL {postmaster} killed, down {down:.1f}s, restarted as {server.pid}", True

    def _partition(self) -> tuple[str, bool]:
        return self._cut(self.schedule.choice(self.hosts.hosts), self.schedule.uniform(1.0, 2.0))

    def _partition_dead(self) -> tuple[str, bool]:
        host = self.hosts[2]
        nodes = _node_processes(host)
        if nodes and self._spared(nodes[0]):  # its daemon, declared dead, is fenced
            return f"spared: {host.name}'s node lost 2 daemons in the last 70 s", False
        return self._cut(host, DEAD_AFTER_S + self.schedule.uniform(2.0, 3.0))

    def _cut(self, host: Host, seconds: float) -> tuple[str, bool]:
        host.link_down()
        try:
            time.sleep(seconds)  # the partition's length: the scenario
        finally:
            host.link_up()
        return f"{host.name} cut off for {seconds:.1f}s", True


class Driver:
    """The job's driver on a host, its output read as it comes."""

    def __init__(self, host: Host, stderr: IO[bytes]) -> None:
        self.process = host.popen(
            [PYTHON, "-c", DRIVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next line of output (None once it ended), waiting up to ``timeout``;
        TimeoutError if none came."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the driver printed nothing for {timeout:g} s") from None

    def stop(self) -> None:
        """Asks it to end after the wave it is in."""
        assert self.process.stdin is not None
        self.process.stdin.write("stop\n")
        self.process.stdin.flush()


@pytest.mark.parametrize("seed", SEEDS)
def test_a_map_reduce_job_survives_every_kind_of_fault(
    seed: int, chaos: Chaos, tmp_path: Path
) -> None:
    print(f"chaos seed {seed} (CAIRN_CHAOS_SEEDS={seed} replays the schedule)")
    killer = Killer(seed, chaos)
    stderr_path = tmp_path / "driver.stderr"
    with open(stderr_path, "wb") as stderr:
        driver = Driver(chaos.hosts[1], stderr)

    def failed(why: str) -> str:
        return (
            f"seed {seed}: {why}\ninjected:\n{killer.report()}\ndriver's stderr:\n"
            f"{stderr_path.read_text(errors='replace')[-4000:]}\n{_state(chaos)}\n"
            f"{_logs(chaos.hosts)}\n" + "\n".join(log[-3000:] for log in chaos.lost_logs)
        )

    waves: list[int] = []
    try:
        assert driver.next_line(120) == "READY", failed("the driver did not start")
        killer.start()
        deadline = time.monotonic() + 300
        while killer.is_alive():  # the job runs on while the faults come
            assert time.monotonic() < deadline, failed("the killer is stuck")
            with contextlib.suppress(queue.Empty):
                line = driver.lines.get(timeout=0.2)
                assert line is not None, failed("the driver ended during the faults")
                waves.append(int(line.split()[2]))
        assert killer.error is None, failed(f"the killer failed: {killer.error!r}")
        driver.stop()
        while (line := driver.next_line(240)) is not None and line.startswith("WAVE"):
            waves.append(int(line.split()[2]))
        assert line is not None, failed("the driver ended without its result")
        results = json.loads(line)
        assert driver.process.wait(60) == 0, failed("the driver failed")
    except TimeoutError as exc:  # the job hangs
        raise AssertionError(failed(str(exc))) from None
    finally:
        killer.stop.set()
        killer.join(120)
        if driver.process.poll() is None:
            driver.process.kill()
            driver.process.wait()
    print(f"chaos seed {seed}: {len(results)} waves; injected:\n{killer.report()}")
    assert not killer.missing, failed(f"never injected: {killer.missing}")
    assert results == waves == [_expected(w) for w in range(len(results))], failed(
        f"results {results} differ from the fault-free ones"
    )

    settled = chaos.hosts[1].run(
        [PYTHON, "-c", SETTLED, "60"], env={auth.TOKEN_ENV: chaos.cluster.token}, timeout=120
    )
    seen = json.loads(settled.stdout.strip().splitlines()[-1])
    dead = seen.pop("dead")
    print("dead nodes:", *dead, sep="\n  ")
    assert seen == {"hosts": ["host0", "host1", "host2"], "leaks": {}}, failed(
        f"after the job: {seen}"
    )
    deaths = Counter(host for host, _cause in dead)
    # a head daemon killed while it started may die before it registered: no dead node
    head_kills = killer.count("head-daemon")
    assert min(head_kills, 1) <= deaths["host0"] <= head_kills, failed(f"dead nodes {dead}")
    assert deaths["host1"] == 0, failed(f"a short partition killed a node: {dead}")
    killed = killer.count("node", "daemon", "partition-dead")  # some while starting, maybe
    killed += killer.failed_starts
    assert min(killed, 1) <= deaths["host2"] <= killed, failed(f"dead nodes {dead}")
