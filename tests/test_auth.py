"""Token authentication on a real cluster (`cairn start`): a node or a raw gRPC call
without the cluster token, or with a wrong one, is refused with a clear error and leaves
nothing in the log but a refusal event; with the token a node joins and runs work.
``--disable-auth`` is for loopback only."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from log_rows import rows, wait_for_rows
from processes import ROOT, run_cairn

from controlplane import auth, local_node
from controlplane.node import rpc
from dataplane.client import CoreClient

pytestmark = pytest.mark.timeout(240)
NO_TOKEN: dict[str, str | None] = {auth.TOKEN_ENV: None}


@dataclass
class Head:
    record: local_node.NodeRecord
    address: str
    token: str
    printed: str  # what `cairn start --head` printed
    gcs_url: str


def _nothing_running() -> None:
    if local_node.local_nodes():
        pytest.fail("Cairn nodes are already running on this machine; `cairn stop` them")


def _gcs_url(session_dir: Path) -> str:
    client = CoreClient(str(session_dir / local_node.NODE_SOCKET), "observer")
    try:
        return client.welcome.gcs_url
    finally:
        client.close()


def _raw_info(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> dict:
    """/cairn.Node/Info as any gRPC client would call it (no Cairn code involved)."""
    with grpc.insecure_channel(address) as channel:
        answer = channel.unary_unary("/cairn.Node/Info")(b"{}", timeout=10, metadata=metadata)
    return json.loads(answer)


def _refused_code(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        _raw_info(address, metadata)
    assert auth.REFUSED in refused.value.details()
    return refused.value.code()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    _nothing_running()
    started = run_cairn("start", "--head", "--port", "0", "--num-cpus", "1", env=NO_TOKEN)
    try:
        record = local_node.running_head()
        assert record is not None and record.address is not None
        token = (record.session_dir / auth.TOKEN_FILE).read_text()
        yield Head(record, record.address, token, started.stdout, _gcs_url(record.session_dir))
    finally:
        run_cairn("stop")


# -- without a running cluster (these come first: the module's head is started later) --


def test_disable_auth_is_refused_off_loopback() -> None:
    _nothing_running()
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        refused = run_cairn(
            "start",
            "--head",
            "--port",
            "0",
            "--disable-auth",
            "--node-ip-address",
            host,
            check=False,
        )
        assert refused.returncode != 0
        assert "--disable-auth is for loopback-only development" in refused.stderr
    assert local_node.local_nodes() == []


def test_disabled_auth_on_loopback_warns_and_serves_without_a_token() -> None:
    _nothing_running()
    started = run_cairn("start", "--head", "--port", "0", "--num-cpus", "1", "--disable-auth")
    try:
        assert "WARNING: authentication is DISABLED" in started.stderr
        assert "Cluster token" not in started.stdout
        record = local_node.running_head()
        assert record is not None and record.address is not None
        assert not (record.session_dir / auth.TOKEN_FILE).exists()
        head_id = (record.session_dir / "node.ready").read_text()
        assert _raw_info(record.address)["node_id"] == head_id
        # a node joins such a head only when it too says --disable-auth
        mismatched = run_cairn("start", "--address", record.address, check=False)
        assert mismatched.returncode != 0
        assert "runs with authentication off (--disable-auth)" in mismatched.stderr
        run_cairn("start", "--address", record.address, "--num-cpus", "1", "--disable-auth")
        (joined,) = [n for n in local_node.local_nodes() if not n.head]
        assert joined.address is not None and "node_id" in _raw_info(joined.address)
    finally:
        run_cairn("stop")


def test_a_supplied_token_is_used_and_not_printed() -> None:
    _nothing_running()
    given = "supplied-" + auth.new_token()
    started = run_cairn(
        "start", "--head", "--port", "0", "--num-cpus", "1", env={auth.TOKEN_ENV: given}
    )
    try:
        assert given not in started.stdout and "Cluster token" not in started.stdout
        record = local_node.running_head()
        assert record is not None and record.address is not None
        assert (record.session_dir / auth.TOKEN_FILE).read_text() == given
        assert _refused_code(record.address) == grpc.StatusCode.UNAUTHENTICATED
        assert "node_id" in _raw_info(record.address, auth.metadata(given))
    finally:
        run_cairn("stop")


# -- on the module's cluster ------------------------------------------------------------


def test_the_token_is_printed_once_and_stored_owner_only(head: Head) -> None:
    assert len(head.token) >= 40  # token_urlsafe(32)
    assert head.printed.count(head.token) == 1
    assert _mode(head.record.session_dir / auth.TOKEN_FILE) == 0o600
    # the driver boundary: the node's Unix socket is its owner's alone
    assert _mode(head.record.session_dir / local_node.NODE_SOCKET) == 0o600


def test_a_raw_grpc_call_without_the_token_is_refused(head: Head) -> None:
    assert _refused_code(head.address) == grpc.StatusCode.UNAUTHENTICATED
    one_off = ("y" if head.token[0] == "x" else "x") + head.token[1:]
    for wrong in (one_off, head.token[:-1], head.token + "x", ""):
        code = _refused_code(head.address, auth.metadata(wrong))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    not_bearer = (("authorization", head.token),)
    assert _refused_code(head.address, not_bearer) == grpc.StatusCode.UNAUTHENTICATED
    # a method the node does not serve is refused just the same, before any lookup
    with grpc.insecure_channel(head.address) as channel, pytest.raises(grpc.RpcError) as exc:
        channel.unary_unary("/cairn.Node/Join")(b"{}", timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = _raw_info(head.address, auth.metadata(head.token))
    assert info["node_id"] == (head.record.session_dir / "node.ready").read_text()
    # Cairn's own client finds the token of this machine's node of the cluster
    assert rpc.call(head.address, "Info", {}, timeout=10)["node_id"] == info["node_id"]
    with pytest.raises(rpc.AuthError, match="refused the call: missing or wrong"):
        rpc.call(head.address, "Info", {}, timeout=10, token="wrong")


def _log_after(url: str, position: int) -> list[tuple[str, str, str, str | None, dict]]:
    """(kind, entity, type, node, payload) of every event after ``position``."""
    found = rows(
        url,
        "SELECT entity_kind::text, entity_id, event_type, node_id, payload::text "
        "FROM events WHERE position > $1 ORDER BY position",
        position,
    )
    return [(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in found]


def _refusals(url: str, position: int) -> list[dict]:
    return [e[4] for e in _log_after(url, position) if e[2] == "auth_refused"]


def _wait_until_committed(head: Head, timeout: float = 10.0) -> None:
    """Until the head has no event left to commit (its write-behind queue is empty)."""
    deadline = time.monotonic() + timeout
    while rpc.call(head.address, "Info", {}, timeout=10, token=head.token)["events_pending"]:
        assert time.monotonic() < deadline, "the head's events did not commit"
        time.sleep(0.05)


def test_a_node_without_the_right_token_is_refused_and_leaves_only_a_refusal(
    head: Head, tmp_path: Path
) -> None:
    head_id = (head.record.session_dir / "node.ready").read_text()
    # earlier tests' refusals are out of the window: once the head has committed every
    # event it counted (they are written behind), none was logged within the interval
    # (it is stamped after the head counted it), so the next refused call is logged
    _wait_until_committed(head)
    wait_for_rows(
        head.gcs_url,
        "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM events WHERE event_type = 'auth_refused' "
        "AND recorded_at > clock_timestamp() - make_interval(secs => $1))",
        auth.REFUSAL_LOG_INTERVAL_S,
        timeout=2 * auth.REFUSAL_LOG_INTERVAL_S + 10,
    )
    before = int(rows(head.gcs_url, "SELECT coalesce(max(position), 0) FROM events")[0][0])
    # no token: a machine that runs no node of this cluster (its own temp directory)
    elsewhere = {**NO_TOKEN, "TMPDIR": str(tmp_path)}
    started = time.monotonic()
    no_token = run_cairn("start", "--address", head.address, check=False, env=elsewhere)
    wrong = run_cairn(
        "start", "--address", head.address, check=False, env={auth.TOKEN_ENV: "wrong"}
    )
    for refused in (no_token, wrong):
        assert refused.returncode != 0
        assert f"the Cairn node at {head.address} refused the call" in refused.stderr
        assert auth.REFUSED in refused.stderr
    for _ in range(50):  # a flood of refused calls: still one event per peer and interval
        _refused_code(head.address)
    windows = (time.monotonic() - started) / auth.REFUSAL_LOG_INTERVAL_S
    deadline = time.monotonic() + 10
    while not _refusals(head.gcs_url, before):
        assert time.monotonic() < deadline, "no auth_refused event was logged"
        time.sleep(0.1)
    # anything else they caused is durable once the head has no event left to commit
    _wait_until_committed(head)

    after = _log_after(head.gcs_url, before)
    # the head's own life goes on (load heartbeats; on a busy machine its pool's worker
    # may come up only now); the refused calls added their refusals and nothing else
    own = {("node", "heartbeat"), ("worker", "started"), ("node", "auth_refused")}
    unexpected = [e for e in after if (e[0], e[2]) not in own or e[3] != head_id]
    assert unexpected == [], unexpected
    assert {e[1] for e in after if e[0] == "node"} == {head_id}
    refusals = [e[4] for e in after if e[2] == "auth_refused"]
    # 52 refused calls from one host: at most one event per interval
    assert 1 <= len(refusals) <= int(windows) + 1, (refusals, windows)
    assert refusals[0]["method"] == "/cairn.Node/Join"
    assert refusals[0]["peer"].startswith("ipv4:127.0.0.1:")
    assert [n.pid for n in local_node.local_nodes()] == [head.record.pid]
    assert not list(tmp_path.glob(f"{local_node.NODES_DIR}/*"))
    registered = rows(
        head.gcs_url,
        "SELECT count(*) FROM events WHERE entity_kind = 'node' AND event_type = 'registered'",
    )[0][0]
    assert registered == 1


DRIVER = """
import json, sdk as ray
ray.init(address="auto")
data = ray.put(bytes(range(256)) * 40_000)  # 10 MB, in the head's store

@ray.remote(resources={"far": 1})
def where(blob):
    return ray.get_runtime_context().get_node_id(), len(blob)

print(json.dumps(ray.get([where.remote(data) for _ in range(3)], timeout=120)))
ray.shutdown()
"""


def test_with_the_token_a_node_joins_and_runs_spilled_work(head: Head) -> None:
    started = run_cairn(
        "start",
        "--address",
        head.address,
        "--num-cpus",
        "2",
        "--resources",
        '{"far": 2}',
        env={auth.TOKEN_ENV: head.token},
    )
    assert "joined to" in started.stdout
    (joined,) = [n for n in local_node.local_nodes() if not n.head]
    assert joined.address is not None
    assert (joined.session_dir / auth.TOKEN_FILE).read_text() == head.token
    assert _mode(joined.session_dir / auth.TOKEN_FILE) == 0o600
    # the joined node's own service requires the same token
    assert _refused_code(joined.address) == grpc.StatusCode.UNAUTHENTICATED
    assert "node_id" in _raw_info(joined.address, auth.metadata(head.token))

    ran = subprocess.run(
        [sys.executable, "-c", DRIVER],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != auth.TOKEN_ENV},
    )
    assert ran.returncode == 0, ran.stderr
    joined_id = (joined.session_dir / "node.ready").read_text()
    results = json.loads(ran.stdout.strip().splitlines()[-1])
    assert results == [[joined_id, 256 * 40_000]] * 3  # spilled there, argument pulled
    moved = rows(
        head.gcs_url,
        "SELECT count(*) FROM events WHERE entity_kind = 'object' AND event_type = 'transferred'",
    )[0][0]
    assert moved >= 1  # ObjectInfo and ReadObject, node to node, with the token
