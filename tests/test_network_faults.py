"""Network faults on a cluster of three hosts (the nemesis): links cut for less and for
longer than the death timeout, a node cut from PostgreSQL only and from its peers
only (nftables rules inside the hosts' namespaces), and a partition of the head's host.
Each test says what the cluster must do and what the user sees.

The head declares a node dead after 4 s without its pings here
(``CAIRN_NODE_DEAD_AFTER_S``), so that a 2 s cut is clearly shorter and an 8 s one
clearly longer, whatever TCP's retransmission timers add."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest
from host_cluster import HostCluster, finish_driver, running, start_driver
from hosts import PYTHON, Host, Hosts, ensure_nft, require_root

pytestmark = pytest.mark.timeout(300)
DEAD_AFTER_S = 4.0
SHORT_CUT_S = 2.0
LONG_CUT_S = 2 * DEAD_AFTER_S


@pytest.fixture(scope="module")
def cluster() -> Iterator[HostCluster]:
    require_root()
    ensure_nft()
    with (
        Hosts(3) as hosts,
        running(hosts, head_env={"CAIRN_NODE_DEAD_AFTER_S": str(DEAD_AFTER_S)}) as cluster,
    ):
        yield cluster


def _block(host: Host, incoming: str, outgoing: str) -> None:
    """Drops the packets the nft rule bodies match, coming in and going out, inside
    ``host``: silence, as a real partition, not a refusal."""
    script = "table inet nemesis {\n"
    for hook, rule in (("input", incoming), ("output", outgoing)):
        script += f"  chain {hook} {{ type filter hook {hook} priority 0; policy accept;\n"
        script += f"    {rule} drop\n  }}\n"
    host.run(["nft", "-f", "-"], input=script + "}\n")


def _unblock(host: Host) -> None:
    host.run(["nft", "delete", "table", "inet", "nemesis"], check=False)


# A driver that runs a job across the cluster in the background of a test: it says
# STARTED once its first results are in, then prints its result.
JOB = """
@ray.remote(scheduling_strategy="SPREAD", max_retries=3)
def work(i):
    import socket
    time.sleep(0.1)
    return i * i, socket.gethostname()
first = ray.get([work.remote(i) for i in range(6)])
print("STARTED", flush=True)
results = ray.get([work.remote(i) for i in range(120)], timeout=120)
print(json.dumps({"sum": sum(r[0] for r in results), "hosts": sorted({r[1] for r in results})}))
"""


def _start_driver(cluster: HostCluster, host: Host, body: str) -> subprocess.Popen[str]:
    driver, line = start_driver(host, cluster.driver_code(body))
    assert line.startswith("STARTED"), line
    return driver


def _deaths(cluster: HostCluster) -> list[str]:
    return [row[0] for row in cluster.sql("SELECT node_id FROM nodes WHERE state = 'DEAD'")]


def test_a_cut_shorter_than_the_death_timeout_kills_nobody(cluster: HostCluster) -> None:
    """host2 is cut off from everyone for 2 s while a job runs: the cluster must not
    declare it dead, and the job continues. The user sees a pause, then the result."""
    victim = cluster.hosts[2]
    before = cluster.node_id(victim)
    driver = _start_driver(cluster, cluster.hosts[1], JOB)
    victim.link_down()
    time.sleep(SHORT_CUT_S)  # the length of the cut: the scenario, not an ordering
    victim.link_up()
    seen = finish_driver(driver, hosts=cluster.hosts.hosts)
    assert seen["sum"] == sum(i * i for i in range(120))
    assert _deaths(cluster) == []
    assert cluster.node_id(victim) == before  # the same incarnation throughout


def test_a_node_cut_from_its_peers_only_stays_and_its_transfers_resume(
    cluster: HostCluster,
) -> None:
    """host2 still reaches PostgreSQL but not host0 or host1 for 3 s, while a job moves
    objects between host1 and host2: it stays alive (its pings reach the log), the
    transfers stall and resume, and the user gets the full result."""
    victim, peer = cluster.hosts[2], cluster.hosts[1]
    gcs_port = _gcs_port(cluster)
    driver, started = start_driver(
        peer,
        cluster.driver_code(
            """
on2 = NodeAffinitySchedulingStrategy(NODES["host2"], soft=False)
@ray.remote(scheduling_strategy=on2)
def total(array):
    return int(array.sum())
ray.get(total.remote(np.ones(10, dtype=np.int64)))
print("STARTED", flush=True)
sys.stdin.readline()  # the cut is in place: these transfers start while it lasts
refs = [total.remote(ray.put(np.full(1_000_000, i, dtype=np.int64))) for i in range(8)]
print(json.dumps({"sums": ray.get(refs, timeout=120)}))
"""
        ),
        stdin=True,
    )
    assert started.startswith("STARTED"), started
    others = ", ".join(h.ip for h in cluster.hosts if h is not victim)
    # everything between host2 and the others but PostgreSQL's connections
    _block(
        victim,
        f"ip saddr {{ {others} }} tcp sport != {gcs_port}",
        f"ip daddr {{ {others} }} tcp dport != {gcs_port}",
    )
    try:
        assert driver.stdin is not None
        driver.stdin.write("go\n")
        driver.stdin.flush()
        time.sleep(3.0)  # the length of the cut
    finally:
        _unblock(victim)
    seen = finish_driver(driver, hosts=cluster.hosts.hosts)
    assert seen["sums"] == [i * 1_000_000 for i in range(8)]
    assert _deaths(cluster) == []


def _gcs_port(cluster: HostCluster) -> int:
    status = cluster.head.cairn("status").stdout
    return int(status.split("127.0.0.1:", 1)[1].split("/", 1)[0])


def test_a_partition_of_the_heads_host_pauses_the_cluster(cluster: HostCluster) -> None:
    """The head's host (PostgreSQL, the monitor, the scheduler) is cut off for 2 s while
    a job driven from host1 runs: appends wait and are retried, nobody is declared
    dead, and the user sees a pause, then the full result."""
    driver = _start_driver(cluster, cluster.hosts[1], JOB)
    cluster.head.link_down()
    time.sleep(SHORT_CUT_S)
    cluster.head.link_up()
    seen = finish_driver(driver, hosts=cluster.hosts.hosts)
    assert seen["sum"] == sum(i * i for i in range(120))
    assert _deaths(cluster) == []


# A task that runs on host2 for 3 s and then returns: placed there before the cut, it
# finishes during it, so host2's old incarnation has a late result to append.
SLOW_ON_2 = """
on2 = NodeAffinitySchedulingStrategy(NODES["host2"], soft=True)
@ray.remote(scheduling_strategy=on2, max_retries=3)
def slow():
    import socket
    time.sleep(3)
    return socket.gethostname()
ref = slow.remote()
print("STARTED " + ref.task_id().hex(), flush=True)
print(json.dumps({"ran_on": ray.get(ref, timeout=120)}))
"""


def test_a_long_cut_declares_the_node_dead_and_refuses_its_old_incarnation(
    cluster: HostCluster,
) -> None:
    """host2 is cut off for 8 s (twice the death timeout) while a task placed on it
    runs. The cluster must declare it dead and run the task again elsewhere (the user
    gets the result, from host0 or host1, a few seconds late). When the link comes
    back, host2's old incarnation tries to append the late result: the log refuses it
    (a stale_refused event names the events it refused) and nothing of that node
    follows its death in the log; the daemon stops, and host2 rejoins under a new id."""
    victim = cluster.hosts[2]
    old = cluster.node_id(victim)
    driver, started = start_driver(cluster.hosts[1], cluster.driver_code(SLOW_ON_2))
    assert started.startswith("STARTED"), started
    task_id = started.split()[1]
    cluster.wait_for_sql(
        "SELECT 1 FROM events WHERE entity_id = $1 AND event_type = 'running' AND node_id = $2",
        task_id,
        old,
        what="the task running on host2",
    )
    victim.link_down()
    try:
        cluster.wait_for_sql(
            "SELECT 1 FROM nodes WHERE node_id = $1 AND state = 'DEAD'",
            old,
            timeout=30,
            what="host2 declared dead",
        )
        seen = finish_driver(driver)  # run again elsewhere while host2 is still cut off
        assert seen["ran_on"] in ("host0", "host1")
        time.sleep(max(0.0, LONG_CUT_S - 3.0))  # the rest of the cut: host2's task is over
    finally:
        victim.link_up()
    refused = cluster.wait_for_sql(
        "SELECT payload::text FROM events WHERE event_type = 'stale_refused' "
        "AND entity_id = $1 AND node_id IS NULL",
        old,
        timeout=60,
        what="the old incarnation's appends refused",
    )
    kinds = {kind for (payload,) in refused for kind in json.loads(payload)["event_types"]}
    assert kinds, refused
    late = cluster.sql(
        "SELECT event_type FROM events WHERE node_id = $1 AND position > "
        "(SELECT position FROM events WHERE entity_kind = 'node' AND entity_id = $1 "
        "AND event_type = 'dead')",
        old,
    )
    assert late == [], late  # nothing of the dead incarnation follows its death
    _rejoined(cluster, victim, old)


def _rejoined(cluster: HostCluster, host: Host, old: str) -> str:
    """Waits until ``host``'s node registered again after the death of ``old`` (its
    node restarts the daemon, which joins under a new id) and runs there; its id."""
    (new,) = cluster.wait_for_sql(
        "SELECT entity_id FROM events WHERE event_type = 'registered' "
        "AND payload->>'address' LIKE $1 AND position > (SELECT position FROM events "
        "WHERE entity_kind = 'node' AND entity_id = $2 AND event_type = 'dead')",
        f"{host.ip}:%",
        old,
        timeout=60,
        what=f"{host.name} rejoined under a new id",
    )[0]
    deadline = time.monotonic() + 30
    while cluster.node_id(host) != new:
        assert time.monotonic() < deadline, f"{host.name} runs {cluster.node_ids[host.name]}"
        time.sleep(0.2)
    assert new != old
    return new


# Run on host2 while it is cut from PostgreSQL: calls host1 as host2's node (its id and
# certificate), as its old incarnation would with a late result; prints the outcome.
LATE_CALL = """
import glob, json, sys
from pathlib import Path
from controlplane import auth, tls
from controlplane.node import rpc
session = Path(glob.glob("/tmp/cairn-session-*")[0])
rpc.use_node_id((session / "node.ready").read_text())
mine = tls.NodeTls.find(session)
try:
    rpc.call(sys.argv[1], "Release", {"object_id": "x"}, 10, auth.read_token(session), secure=mine)
    print(json.dumps({"outcome": "accepted"}))
except Exception as exc:
    print(json.dumps({"outcome": f"{type(exc).__name__}: {exc}"}))
"""


def test_a_node_cut_from_postgres_only_is_declared_dead_and_its_calls_refused(
    cluster: HostCluster,
) -> None:
    """host2 cannot reach PostgreSQL but still reaches its peers: its pings stop, so the
    cluster declares it dead; its peers then refuse its calls (a late result handed
    over gRPC), and say so in the log. Once PostgreSQL is reachable again, the old
    incarnation learns of its death, stops, and host2 rejoins under a new id."""
    victim = cluster.hosts[2]
    old = cluster.node_id(victim)
    gcs_port = _gcs_port(cluster)
    # PostgreSQL's connections only: to its port going out, from it coming in
    _block(
        victim,
        f"ip saddr {cluster.head.ip} tcp sport {gcs_port}",
        f"ip daddr {cluster.head.ip} tcp dport {gcs_port}",
    )
    try:
        cluster.wait_for_sql(
            "SELECT 1 FROM nodes WHERE node_id = $1 AND state = 'DEAD'",
            old,
            timeout=30,
            what="host2 declared dead",
        )
        (peer_address,) = cluster.sql(
            "SELECT address FROM nodes WHERE node_id = $1", cluster.node_ids["host1"]
        )[0]
        deadline = time.monotonic() + 30
        while True:  # host1 learns of the death from the log within a moment
            late = json.loads(
                victim.run([PYTHON, "-c", LATE_CALL, peer_address]).stdout.splitlines()[-1]
            )
            if late["outcome"] != "accepted" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "was declared dead" in late["outcome"], late
        assert cluster.node_id(victim) == old  # still the old incarnation: it cannot know
    finally:
        _unblock(victim)
    refusal = cluster.wait_for_sql(
        "SELECT payload->>'method' FROM events WHERE event_type = 'stale_refused' "
        "AND entity_id = $1 AND node_id = $2",
        old,
        cluster.node_ids["host1"],
        what="host1's refusal in the log",
    )
    assert refusal[0][0] == "/cairn.Node/Release"
    _rejoined(cluster, victim, old)
    seen = cluster.driver(cluster.hosts[1], JOB.replace('print("STARTED", flush=True)', ""))
    assert seen["sum"] == sum(i * i for i in range(120)) and "host2" in seen["hosts"]
