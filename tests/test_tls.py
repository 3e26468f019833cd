"""TLS between nodes, on loopback (`--tls on`; the hosts tests prove it across
machines): a node joins over the token-derived bootstrap handshake and gets a
certificate of the cluster CA; tasks and objects move over mutual TLS; a plain-text
client, a certificate of another CA, a wrong token and a bootstrap certificate used for
anything but ``Join`` are all refused. The cluster runs with its own temp directory, so
it is invisible to (and unbothered by) other tests' clusters."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest
from cryptography import x509
from processes import ROOT, isolated_env, private_temp_dir, run_cairn

from controlplane import auth, schema, tls
from controlplane.embedded_postgres import EmbeddedPostgres, ServerTls, hba_rules
from controlplane.gcs_url import with_query
from controlplane.node import rpc

pytestmark = pytest.mark.timeout(240)
TOKEN = "tls-test-" + auth.new_token()


@dataclass
class Cluster:
    tmp: Path
    head: Path  # session directories
    node: Path
    head_address: str
    node_address: str

    def env(self, **extra: str) -> dict[str, str]:
        return isolated_env(self.tmp, **{auth.TOKEN_ENV: TOKEN, **extra})


def _cairn(tmp: Path, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    return run_cairn(*args, check=check, tmp=tmp, env={auth.TOKEN_ENV: TOKEN, **env})


def _records(tmp: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp / "cairn-nodes").glob("*.json"))]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    tmp = private_temp_dir()
    try:
        _cairn(tmp, "start", "--head", "--port", "0", "--num-cpus", "1", "--tls", "on")
        (head,) = _records(tmp)
        _cairn(tmp, "start", "--address", head["address"], "--num-cpus", "2", "--tls", "on")
        (node,) = [r for r in _records(tmp) if not r["head"]]
        yield Cluster(
            tmp,
            Path(head["session_dir"]),
            Path(node["session_dir"]),
            head["address"],
            node["address"],
        )
    finally:
        _cairn(tmp, "stop", check=False)
        shutil.rmtree(tmp, ignore_errors=True)


DRIVER = """
import json, os, numpy as np
import sdk as ray
ray.init(address="auto")

@ray.remote(scheduling_strategy="SPREAD")
def where():
    return ray.get_runtime_context().get_node_id()

@ray.remote(num_cpus=2)  # only the joined node has 2 CPUs
def big(n):
    return np.arange(n, dtype=np.int64)

nodes = set(ray.get([where.remote() for _ in range(12)]))
array = ray.get(big.remote(3_000_000))  # 24 MB: pulled in chunks over TLS
back = ray.get(big.remote(10))
print(json.dumps({"nodes": sorted(nodes), "sum": int(array.sum()), "len": len(array)}))
ray.shutdown()
"""


def test_a_node_joins_and_work_and_objects_cross_over_tls(cluster: Cluster) -> None:
    result = subprocess.run(
        [sys.executable, "-c", DRIVER],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
        env=cluster.env(),
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    head_id = (cluster.head / "node.ready").read_text()
    node_id = (cluster.node / "node.ready").read_text()
    assert seen["nodes"] == sorted([head_id, node_id])
    n = 3_000_000
    assert seen["len"] == n and seen["sum"] == n * (n - 1) // 2


def test_the_joined_node_holds_a_certificate_of_the_cluster_ca(cluster: Cluster) -> None:
    head_tls, node_tls = tls.NodeTls.find(cluster.head), tls.NodeTls.find(cluster.node)
    assert head_tls is not None and node_tls is not None
    authority = head_tls.authority()
    assert authority is not None and node_tls.authority() is None  # the CA key stays home
    assert node_tls.ca() == authority.certificate
    assert authority.issued(node_tls.cert_path.read_bytes())
    cert = x509.load_pem_x509_certificate(node_tls.cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    for path in (node_tls.key_path, head_tls.directory / tls.CA_KEY):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(node_tls.directory.stat().st_mode) == 0o700


def _info(address: str, secure: tls.NodeTls | tls.Bootstrap | None) -> dict:
    return rpc.call(address, "Info", {}, timeout=10, token=TOKEN, secure=secure)


def test_only_the_clusters_certificates_get_in(cluster: Cluster, tmp_path: Path) -> None:
    node_tls = tls.NodeTls.find(cluster.node)
    assert node_tls is not None
    head_id = (cluster.head / "node.ready").read_text()
    assert _info(cluster.head_address, node_tls)["node_id"] == head_id

    # plain text: no TLS handshake, no answer (the token alone is not enough)
    with pytest.raises(ConnectionError):
        _info(cluster.head_address, None)
    # a certificate of another CA, for the same names: refused in the handshake
    other = tls.Authority.create("Cairn cluster CA")
    key = tls.new_key()
    forged = other.issue(key.public_key(), "cairn node", ["127.0.0.1"])
    stranger = tls.NodeTls.write(tmp_path, node_tls.ca(), forged, tls.key_pem(key))
    with pytest.raises(ConnectionError, match="handshake"):
        _info(cluster.head_address, stranger)
    # the joiner's bootstrap certificate: good for Join, not for anything else
    bootstrap = tls.Bootstrap.from_token(TOKEN)
    assert rpc.call(cluster.head_address, "Join", {}, 10, TOKEN, secure=bootstrap)["tls"]
    with pytest.raises(rpc.AuthError, match="node certificate of the cluster CA"):
        _info(cluster.head_address, bootstrap)
    # a wrong token derives another join CA: the head's handshake refuses it
    with pytest.raises(ConnectionError, match="cluster token is not the head's"):
        rpc.join(cluster.head_address, "wrong", request={"csr": "x", "hosts": []})


def test_a_plain_text_joiner_is_told_what_is_wrong(cluster: Cluster) -> None:
    refused = _cairn(
        cluster.tmp, "start", "--address", cluster.head_address, "--tls", "off", check=False
    )
    assert refused.returncode != 0
    assert f"cannot reach a Cairn head at {cluster.head_address}" in refused.stderr
    assert len(_records(cluster.tmp)) == 2  # nothing half-started


def test_tls_needs_the_token() -> None:
    tmp_path = private_temp_dir()
    refused = _cairn(
        tmp_path, "start", "--head", "--port", "0", "--tls", "on", "--disable-auth", check=False
    )
    assert refused.returncode != 0 and "TLS needs the cluster token" in refused.stderr
    assert not (tmp_path / "cairn-nodes").exists() or _records(tmp_path) == []
    shutil.rmtree(tmp_path)


def test_tls_is_on_by_default_off_loopback() -> None:
    assert not tls.wanted("auto", "127.0.0.1")
    assert tls.wanted("auto", "127.0.0.1", "192.0.2.10")
    assert tls.wanted("on", "127.0.0.1") and not tls.wanted("off", "192.0.2.10")
    with pytest.raises(ValueError, match="--tls must be one of"):
        tls.wanted("maybe", "127.0.0.1")


def test_postgres_lets_in_only_the_runtime_from_other_machines() -> None:
    for rules in (hba_rules(None, tls=True), hba_rules("192.0.2.10", tls=True)):
        # loopback only: with TLS, other machines come through the TLS front
        assert "0.0.0.0/0" not in rules and "::/0" not in rules and "trust" not in rules
    plain = [line.split() for line in hba_rules("192.0.2.10", tls=False).splitlines()]
    remote = [line for line in plain if line and line[3:4] in (["0.0.0.0/0"], ["::/0"])]
    assert remote == [
        ["host", "cairn", "cairn_runtime", "0.0.0.0/0", "scram-sha-256"],
        ["host", "cairn", "cairn_runtime", "::/0", "scram-sha-256"],
    ]


@pytest.fixture(scope="module")
def fronted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedPostgres, Path]]:
    """An embedded server served on 127.0.0.2 (another loopback address: "another
    machine" as far as its TLS front is concerned) with a cluster CA of its own; the
    path holds a client certificate of that CA."""
    authority = tls.Authority.create("Cairn cluster CA")
    key = tls.new_key()
    cert = authority.issue(key.public_key(), "cairn gcs", ["127.0.0.2"], client=False)
    server = EmbeddedPostgres(
        listen_host="127.0.0.2",
        tls=ServerTls(cert, tls.key_pem(key), authority.certificate),
    )
    try:
        schema.upgrade(server.start())
        server.runtime_url()  # the runtime's login
        client_key = tls.new_key()
        client = authority.issue(client_key.public_key(), "cairn node", ["127.0.0.1"])
        directory = tmp_path_factory.mktemp("client")
        tls.NodeTls.write(directory, authority.certificate, client, tls.key_pem(client_key))
        yield server, directory / tls.TLS_DIR
    finally:
        server.stop()


def _front_url(server: EmbeddedPostgres, **params: str) -> str:
    return with_query(server.cluster_url(), params)


def test_the_tls_front_admits_the_runtime_with_a_cluster_certificate(
    fronted: tuple[EmbeddedPostgres, Path],
) -> None:
    server, client = fronted
    node_tls = tls.NodeTls(client)
    url = _front_url(server, **node_tls.postgres_params())
    assert "@127.0.0.2:" in url
    with psycopg.connect(url) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == ("cairn_runtime",)
        assert conn.execute("SELECT count(*) FROM events").fetchone() is not None

    async def through_asyncpg() -> str:
        connection = await asyncpg.connect(url)
        try:
            return str(await connection.fetchval("SELECT current_user"))
        finally:
            await connection.close()

    assert asyncio.run(through_asyncpg()) == "cairn_runtime"


def test_the_tls_front_refuses_everything_else(
    fronted: tuple[EmbeddedPostgres, Path], tmp_path: Path
) -> None:
    server, client = fronted
    node_tls = tls.NodeTls(client)
    with pytest.raises(psycopg.OperationalError, match="must use TLS"):
        psycopg.connect(_front_url(server, sslmode="disable"), connect_timeout=10)
    # the superuser, with its password and a good certificate: not from another machine
    owner = server.url.replace("@127.0.0.1:", "@127.0.0.2:")
    with pytest.raises(psycopg.OperationalError, match="only the login 'cairn_runtime'"):
        psycopg.connect(with_query(owner, node_tls.postgres_params()), connect_timeout=10)
    # no client certificate, or one of another CA: the handshake fails
    no_cert = {"sslmode": "verify-full", "sslrootcert": str(node_tls.ca_path)}
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_front_url(server, **no_cert), connect_timeout=10)
    other = tls.Authority.create("Cairn cluster CA")
    key = tls.new_key()
    forged = other.issue(key.public_key(), "cairn node", ["127.0.0.1"])
    stranger = tls.NodeTls.write(tmp_path, node_tls.ca(), forged, tls.key_pem(key))
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_front_url(server, **stranger.postgres_params()), connect_timeout=10)
    # the server itself listens on loopback only: every outside byte passes the front
    with psycopg.connect(server.url) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)


def test_a_bad_signing_request_is_refused() -> None:
    authority = tls.Authority.create("Cairn cluster CA")
    with pytest.raises(tls.TlsError, match="not a certificate signing request"):
        authority.issue_for_request(b"garbage", "cairn node", ["127.0.0.1"])
    assert not authority.issued(b"garbage")
