"""A cluster of three hosts that share nothing but a network link (tests/hosts.py), on
the embedded default: the head on host0 serves its PostgreSQL to the others, every
link between hosts is TLS (on by default off loopback), and the cluster runs tasks,
actors, placement groups and object transfers across hosts, survives the loss of a
node, and refuses strangers: a wrong token, a plain-text client, a certificate of
another CA. Drivers run inside the hosts and reach the cluster through their own
host's node, as on real machines."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from host_cluster import HostCluster, finish_driver, running, start_driver
from hosts import PYTHON, Hosts, require_root

from controlplane import auth

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster() -> Iterator[HostCluster]:
    require_root()
    # (the log on two embedded servers of the head: the nodes on the other hosts reach
    # the second at the head's address, with their own certificates)
    log_on_two = {"CAIRN_LOG_SERVERS": "2", "CAIRN_LOG_SHARDS": "4"}
    with Hosts(3) as hosts, running(hosts, head_env=log_on_two) as cluster:
        yield cluster


def test_nodes_join_the_embedded_default_over_tls(cluster: HostCluster) -> None:
    status = cluster.head.cairn("status").stdout
    assert "3 nodes alive, 0 dead" in status, status
    seen = cluster.driver(
        cluster.hosts[1],
        "print(json.dumps({'nodes': ray.nodes(), 'cpus': ray.cluster_resources()['CPU'],"
        " 'gcs': ray.get_runtime_context().gcs_address}))",
    )
    by_ip = {n["NodeManagerAddress"]: n for n in seen["nodes"]}
    assert set(by_ip) == {h.ip for h in cluster.hosts}
    assert all(n["Alive"] for n in seen["nodes"]) and seen["cpus"] == 5.0
    for host in cluster.hosts:
        assert by_ip[host.ip]["NodeID"] == cluster.node_ids[host.name]
    # a joined node reaches the head's PostgreSQL at the head's address, verified TLS
    gcs = seen["gcs"]
    assert f"@{cluster.head.ip}:" in gcs and "sslmode=verify-full" in gcs, auth_free(gcs)
    for host in cluster.hosts[1:]:  # its key and certificate stay on its own host
        listing = host.run(["sh", "-c", "ls /tmp/cairn-session-*/tls"]).stdout.split()
        assert sorted(listing) == ["ca.crt", "node.crt", "node.key"]


def auth_free(url: str) -> str:
    return re.sub(r":[^:@/]+@", ":***@", url)


def test_spread_tasks_reach_every_host(cluster: HostCluster) -> None:
    seen = cluster.driver(
        cluster.hosts[2],
        """
@ray.remote(scheduling_strategy="SPREAD")
def where():
    import socket, time
    time.sleep(0.05)
    return ray.get_runtime_context().get_node_id(), socket.gethostname()
print(json.dumps(sorted(set(map(tuple, ray.get([where.remote() for _ in range(24)]))))))
""",
    )
    assert {tuple(x) for x in seen} == {(cluster.node_ids[h.name], h.name) for h in cluster.hosts}


def test_objects_move_both_ways_intact(cluster: HostCluster) -> None:
    """A 40 MB array put on host1 goes to a task on host2, which returns a 40 MB array
    made there; each side checks the other's bytes (pulled in chunks over TLS, each
    object's checksum verified on arrival), and the log shows both transfers."""
    seen = cluster.driver(
        cluster.hosts[1],
        """
import hashlib
def digest(a): return hashlib.sha256(a.tobytes()).hexdigest()
on2 = NodeAffinitySchedulingStrategy(NODES["host2"], soft=False)
@ray.remote(scheduling_strategy=on2)
def echo_back(array):
    import hashlib, socket
    mine = np.arange(5_000_000, dtype=np.int64) * 3
    return (socket.gethostname(), hashlib.sha256(array.tobytes()).hexdigest(), mine)
sent = np.random.default_rng(7).integers(0, 1 << 62, 5_000_000)
host, got_digest, made = ray.get(echo_back.remote(ray.put(sent)))
print(json.dumps({"host": host, "sent": digest(sent) == got_digest,
                  "back": digest(made) == digest(np.arange(5_000_000, dtype=np.int64) * 3)}))
""",
    )
    assert seen == {"host": "host2", "sent": True, "back": True}
    moved = _sql(
        cluster,
        "SELECT count(*) FILTER (WHERE (payload->>'size_bytes')::bigint > 30000000) "
        "FROM events WHERE event_type = 'transferred'",
    )
    assert int(moved) >= 2, moved  # host1 -> host2 (the argument), host2 -> host1 (result)
    # the log lies on two servers; what a node says of an object it fetched names no job,
    # and goes to the server of the object's job all the same: each object in one shard
    assert _sql(cluster, "SELECT count(*) FROM log_servers") == "2"
    split = _sql(
        cluster,
        "SELECT count(*) FROM (SELECT entity_id FROM events WHERE entity_kind = 'object' "
        "GROUP BY entity_id HAVING count(DISTINCT shard) > 1) split",
    )
    assert split == "0", split


def _sql(cluster: HostCluster, statement: str) -> str:
    return cluster.sql(statement)[0][0]


def test_a_driver_gets_a_large_result_made_on_another_host(cluster: HostCluster) -> None:
    seen = cluster.driver(
        cluster.head,
        """
@ray.remote(num_cpus=2)  # only host1 and host2 have 2 CPUs
def make():
    import socket
    return socket.gethostname(), np.full(64 * 1024 * 1024 // 8, 7, dtype=np.int64)
host, array = ray.get(make.remote())
print(json.dumps({"host": host, "ok": bool((array == 7).all()), "n": int(array.size)}))
""",
    )
    assert seen["host"] in ("host1", "host2") and seen["ok"] and seen["n"] == 8 * 1024 * 1024


def test_strict_spread_places_one_bundle_per_host(cluster: HostCluster) -> None:
    seen = cluster.driver(
        cluster.hosts[1],
        """
from sdk.util.placement_group import placement_group, remove_placement_group
from sdk.util.scheduling_strategies import PlacementGroupSchedulingStrategy
group = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
assert ray.get(group.ready(), timeout=60)
@ray.remote(num_cpus=1)
def host():
    import socket
    return socket.gethostname()
hosts = ray.get([
    host.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
    for i in range(3)
])
impossible = placement_group([{"CPU": 1}] * 4, strategy="STRICT_SPREAD")
print(json.dumps({"hosts": hosts, "fourth": ray.wait([impossible.ready()], timeout=3)[0]}))
remove_placement_group(group)
remove_placement_group(impossible)
""",
    )
    assert sorted(seen["hosts"]) == ["host0", "host1", "host2"]
    assert seen["fourth"] == []  # three hosts: a fourth strict-spread bundle waits


def test_an_actor_lives_on_a_remote_host(cluster: HostCluster) -> None:
    seen = cluster.driver(
        cluster.head,
        """
@ray.remote(scheduling_strategy=NodeAffinitySchedulingStrategy(NODES["host2"], soft=False))
class Counter:
    def __init__(self): self.n = 0
    def add(self, k):
        import socket
        self.n += k
        return self.n, socket.gethostname()
counter = Counter.remote()
results = ray.get([counter.add.remote(1) for _ in range(20)])
print(json.dumps({"values": [r[0] for r in results], "hosts": sorted({r[1] for r in results})}))
""",
    )
    assert seen == {"values": list(range(1, 21)), "hosts": ["host2"]}


def test_a_wrong_token_from_another_host_is_refused(cluster: HostCluster) -> None:
    stranger = cluster.hosts[2]
    refused = stranger.cairn(
        "start",
        "--address",
        f"{cluster.head.ip}:6380",
        "--node-ip-address",
        stranger.ip,
        "--port",
        "7000",
        env={auth.TOKEN_ENV: "not-the-token"},
        check=False,
    )
    assert refused.returncode != 0
    assert "the cluster token is not the head's" in refused.stderr, refused.stderr
    assert "3 nodes alive, 0 dead" in cluster.head.cairn("status").stdout


# Run on a host: asks the head's HTTP service as another machine would.
HTTP_STRANGER = """
import json, sys, urllib.request, urllib.error
from sdk.job_submission import JobSubmissionClient
base, token = sys.argv[1], sys.argv[2]
out = {}
for name, headers in (("no token", {}), ("wrong token", {"Authorization": "Bearer nope"}),
                      ("token", {"Authorization": f"Bearer {token}"})):
    request = urllib.request.Request(base + "/api/cairn/health", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            out[name] = answer.status
    except urllib.error.HTTPError as error:
        out[name] = error.code
out["jobs"] = [j for j in JobSubmissionClient(base).list_jobs() if j.type == "SUBMISSION"] == []
# the dashboard, as a browser there: sent to the login page, then signed in by cookie
import http.cookiejar
cookies = urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
browser = urllib.request.build_opener(cookies)
with browser.open(base + "/", timeout=10) as page:
    out["page without token"] = (page.url.endswith("/login"), 'id="login"' in page.read().decode())
def login(token):
    body = json.dumps({"token": token}).encode()
    request = urllib.request.Request(base + "/api/cairn/login", data=body, method="POST")
    try:
        with browser.open(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code
out["login wrong"], out["login"] = login("nope"), login(token)
with browser.open(base + "/", timeout=10) as page:
    out["page signed in"] = "dashboard.js" in page.read().decode()
with browser.open(base + "/api/cairn/state/nodes", timeout=10) as answer:
    out["nodes signed in"] = len(json.loads(answer.read())["rows"]) > 0
print(json.dumps(out))
"""


def test_an_http_service_other_machines_reach_asks_them_for_the_token_and_its_dashboard_a_login(
    cluster: HostCluster,
) -> None:
    # (the head's own listens on loopback, as Ray's dashboard: one on the head's
    # address, over its log, is what --dashboard-host would make)
    server = cluster.head.popen(
        [
            PYTHON,
            "-m",
            "controlplane.cli",
            "dashboard",
            "--host",
            cluster.head.ip,
            "--port",
            "8266",
        ],
        env={auth.TOKEN_ENV: cluster.token},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and "http://" in server.stdout.readline()
    stranger = cluster.hosts[2]
    base = f"http://{cluster.head.ip}:8266"
    seen = stranger.run(
        [PYTHON, "-c", HTTP_STRANGER, base, cluster.token], env={auth.TOKEN_ENV: cluster.token}
    )
    assert json.loads(seen.stdout.strip().splitlines()[-1]) == {
        "no token": 401,
        "wrong token": 401,
        "token": 200,
        "jobs": True,
        "page without token": [True, True],
        "login wrong": 401,
        "login": 200,
        "page signed in": True,
        "nodes signed in": True,
    }
    server.terminate()
    server.wait(30)


# Run on a host: tries the head's services the ways a stranger would; prints outcomes.
STRANGER = """
import json, sys, grpc, psycopg
from controlplane import auth, tls
from controlplane.node import rpc
head, gcs_port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {}
def attempt(name, call):
    try:
        call()
        out[name] = "accepted"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"[:300]
def grpc_plain():
    with grpc.insecure_channel(head) as channel:
        channel.unary_unary("/cairn.Node/Info")(b"{}", timeout=5, metadata=auth.metadata(token))
attempt("grpc plain text, right token", grpc_plain)
other = tls.Authority.create("Cairn cluster CA")
key = tls.new_key()
forged = other.issue(key.public_key(), "cairn node", [sys.argv[4]])
mine = tls.NodeTls.find(__import__("glob").glob("/tmp/cairn-session-*")[0])
fake = tls.NodeTls.write(__import__("pathlib").Path("/tmp"), mine.ca(), forged, tls.key_pem(key))
attempt("grpc other CA", lambda: rpc.call(head, "Info", {}, 5, token, secure=fake))
attempt("grpc cluster CA", lambda: rpc.call(head, "Info", {}, 5, token, secure=mine))
base = f"postgresql://cairn_runtime:x@{head.split(':')[0]}:{gcs_port}/cairn"
plain = base + "?sslmode=disable"
attempt("postgres plain text", lambda: psycopg.connect(plain, connect_timeout=5))
params = "&".join(f"{k}={v}" for k, v in fake.postgres_params().items())
attempt("postgres other CA", lambda: psycopg.connect(base + "?" + params, connect_timeout=5))
print(json.dumps(out))
"""


def test_tls_is_in_force_between_hosts(cluster: HostCluster) -> None:
    """Every service a host offers on its network address is TLS with client
    certificates of the cluster CA: a plain-text client, and a client with a certificate
    of another CA, are refused by the head's gRPC service and its PostgreSQL."""
    gcs_port = int(re.findall(r"127\.0\.0\.1:(\d+)", cluster.head.cairn("status").stdout)[0])
    # (and the log's second server, which the head serves at its address too)
    addresses = cluster.sql("SELECT address FROM log_servers ORDER BY server_index")
    log_ports = [urlsplit(address).port for (address,) in addresses]
    assert log_ports[0] == gcs_port and len(log_ports) == 2
    stranger = cluster.hosts[1]
    for port in [gcs_port, *log_ports[1:]]:
        result = stranger.run(
            [PYTHON, "-c", STRANGER, cluster.address, str(port), cluster.token, stranger.ip],
            timeout=60,
        )
        outcomes = json.loads(result.stdout.strip().splitlines()[-1])
        assert outcomes["grpc cluster CA"] == "accepted"  # the control: a node's certificate
        assert (
            "UNAVAILABLE" in outcomes["grpc plain text, right token"]
            or "Connection" in (outcomes["grpc plain text, right token"])
        ), outcomes
        assert outcomes["grpc other CA"].startswith("ConnectionError"), outcomes
        assert "must use TLS" in outcomes["postgres plain text"], outcomes
        assert outcomes["postgres other CA"].startswith("OperationalError"), outcomes
    # and nothing else listens on the hosts' network addresses in plain text
    for host in cluster.hosts:
        listening = host.run(["ss", "-Hltn"]).stdout
        exposed = sorted(
            {
                int(m.group(2))
                for m in re.finditer(r"\s(\S+):(\d+)\s", listening)
                if m.group(1) not in ("127.0.0.1", "[::1]")
            }
        )
        expected = [6380, gcs_port, *log_ports[1:]] if host is cluster.head else []
        assert set(expected) <= set(exposed) and len(exposed) == len(expected) + (
            host is not cluster.head
        ), (host.name, listening)


# A driver that makes a chain of tasks whose large result stays on host2, says READY,
# waits for a line on stdin (host2 is killed meanwhile), then uses the result.
CHAIN = """
import json, sys, socket, numpy as np, sdk as ray
from sdk.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address="auto")
on2 = NodeAffinitySchedulingStrategy(sys.argv[1], soft=True)
@ray.remote(num_returns=2, scheduling_strategy=on2)
def step(previous, i):
    base = previous if previous is not None else np.zeros(2_000_000, dtype=np.int64)
    return base + i, socket.gethostname()
ref = None
hosts = []
for i in range(1, 6):
    ref, host = step.remote(ref, i)
    hosts.append(host)
made_on = ray.get(hosts)
ray.wait([ref], fetch_local=False, timeout=60)
print("READY " + json.dumps(made_on), flush=True)
sys.stdin.readline()
@ray.remote
def first(array):
    return int(array[0]), socket.gethostname()
value, where = ray.get(first.remote(ref), timeout=120)
print(json.dumps({"value": value, "where": where, "made_on": made_on}), flush=True)
ray.shutdown()
"""


def test_a_lost_node_is_declared_dead_and_its_objects_rebuilt(cluster: HostCluster) -> None:
    """A chain of tasks made its result on host2, where it stays (it is large), for a
    driver on host1; host2 is then killed outright. The head declares it dead, and the
    driver, asking for the result, gets it rebuilt by re-running its lineage on the
    hosts left."""
    victim, survivor = cluster.hosts[2], cluster.hosts[1]
    driver, ready = start_driver(survivor, CHAIN, cluster.node_ids["host2"], stdin=True)
    try:
        assert ready.startswith("READY"), ready
        assert json.loads(ready.split(" ", 1)[1]) == ["host2"] * 5
        victim.kill_processes()
    finally:
        seen = finish_driver(driver, input="go\n", hosts=cluster.hosts.hosts)
    assert seen["value"] == 15 and seen["where"] in ("host0", "host1")
    status = cluster.head.cairn("status").stdout
    assert "2 nodes alive, 1 dead" in status, status
    rebuilt = _sql(
        cluster,
        "SELECT count(*) FROM events WHERE event_type = 'reconstructing'",
    )
    assert int(rebuilt) >= 1
