"""``cairn start`` and ``cairn stop``: a node of this machine started (the head, with its
GCS, or one that joins a head) and every node of this machine stopped."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from controlplane.local_node import JoinedTls

from controlplane import auth, tls
from controlplane.gcs_url import ENV_VAR as GCS_URL_ENV
from controlplane.labels import parse_labels_option
from controlplane.node import rpc


@click.command()
@click.option("--head", is_flag=True, help="Start a head node (the GCS and a node daemon).")
@click.option("--address", default=None, help="Join the cluster whose head is at HOST:PORT.")
@click.option(
    "--port",
    type=int,
    default=None,
    help=f"Port of the node's gRPC service (head: {rpc.DEFAULT_HEAD_PORT}; node: any free).",
)
@click.option(
    "--node-ip-address",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (loopback unless given).",
)
@click.option(
    "--gcs-url",
    "gcs_urls",
    envvar=GCS_URL_ENV,
    multiple=True,
    help=f"PostgreSQL URL of the log (default: ${GCS_URL_ENV}; none: an embedded server). "
    "Head only, given more than once: one log on those servers, the first its home "
    '(controlplane/README.md, "A log on several servers").',
)
@click.option("--num-cpus", type=float, default=None, help="CPUs of this node (default: all).")
@click.option("--num-gpus", type=float, default=None, help="GPUs of this node.")
@click.option("--resources", default=None, help="Custom resources, as JSON: '{\"disk\": 2}'.")
@click.option(
    "--labels",
    default=None,
    help='Labels of this node, for label_selector: JSON (\'{"zone": "us-a"}\') or '
    '"zone=us-a,gpu=a100".',
)
@click.option("--object-store-memory", type=int, default=None, help="Store size in bytes.")
@click.option(
    "--memory",
    type=int,
    default=None,
    help="Memory for tasks and actors, in bytes: Ray's `memory` resource (default: what "
    "the machine has available less the object store).",
)
@click.option("--block", is_flag=True, help="Stay in the foreground until the node stops.")
@click.option(
    "--disable-auth",
    is_flag=True,
    help="Serve gRPC without the cluster token: loopback-only development, never more.",
)
@click.option(
    "--tls",
    "tls_mode",
    type=click.Choice(tls.MODES),
    default="auto",
    show_default=True,
    help="TLS on every link between machines (gRPC and PostgreSQL); auto: on when the "
    "cluster has an address that is not loopback. 'off' sends everything in clear text.",
)
@click.option(
    "--gcs-replicas",
    type=int,
    default=0,
    show_default=True,
    help="Head only: synchronous replicas of the embedded GCS (0 or 1), on this machine "
    "unless --gcs-replica-host names another; a watchdog promotes the replica when the "
    "primary is gone, and every process follows.",
)
@click.option(
    "--log-shards",
    type=click.IntRange(1, 1024),
    default=None,
    help="Head only: how many shards the log has from now on (as $CAIRN_LOG_SHARDS; "
    "default: as it is, 1 for a new GCS). Each job's events go to a shard of their own "
    '(controlplane/README.md, "The sharded log").',
)
@click.option(
    "--log-servers",
    type=click.IntRange(1, 64),
    default=None,
    help="Head only, embedded GCS: start this many PostgreSQL servers and place the log's "
    "shards on them (as $CAIRN_LOG_SERVERS; at least as many shards as servers).",
)
@click.option(
    "--gcs-replica-host",
    default=None,
    help="Head only, with --gcs-replicas 1: run the replica on that machine instead of "
    "this one (start a node there with --gcs-replica), so that the cluster outlives "
    "this machine; with --log-servers, the replica of each server.",
)
@click.option(
    "--gcs-replica",
    "run_gcs_replica",
    is_flag=True,
    help="Joining node only: run the head's GCS replica on this machine (the head was "
    "started with --gcs-replica-host and this machine's address).",
)
@click.option(
    "--include-dashboard/--no-include-dashboard",
    default=True,
    show_default=True,
    help="Head only: serve the dashboard, the jobs' REST API and the metrics over HTTP.",
)
@click.option(
    "--dashboard-port",
    type=int,
    default=8265,
    show_default=True,
    help="Head only: the HTTP service's port (0: any free one).",
)
@click.option(
    "--dashboard-host",
    default=None,
    help="Head only: the address the HTTP service listens at (default: 127.0.0.1, as Ray's "
    "dashboard). It speaks plain HTTP: calls from other machines must carry the cluster "
    "token, which crosses the network in clear text unless a TLS proxy is put in front.",
)
@click.option("--node-config", default=None, hidden=True)  # from start_in_background
def start(
    head: bool,
    address: str | None,
    port: int | None,
    node_ip_address: str,
    gcs_urls: tuple[str, ...],
    num_cpus: float | None,
    num_gpus: float | None,
    resources: str | None,
    labels: str | None,
    object_store_memory: int | None,
    memory: int | None,
    block: bool,
    disable_auth: bool,
    tls_mode: str,
    gcs_replicas: int,
    log_shards: int | None,
    log_servers: int | None,
    gcs_replica_host: str | None,
    run_gcs_replica: bool,
    include_dashboard: bool,
    dashboard_port: int,
    dashboard_host: str | None,
    node_config: str | None,
) -> None:
    """Start a node: a head (--head) or one that joins a head (--address HOST:PORT).
    Every gRPC call between nodes carries the cluster token: the head draws it (or takes
    $CAIRN_AUTH_TOKEN), a joining node reads $CAIRN_AUTH_TOKEN or, on the head's
    machine, the head's session directory."""
    from controlplane import local_node

    if head == (address is not None):
        raise click.UsageError("pass either --head or --address HOST:PORT")
    gcs_url: str | tuple[str, ...] | None = gcs_urls if len(gcs_urls) > 1 else None
    if len(gcs_urls) == 1:
        gcs_url = gcs_urls[0]
    if len(gcs_urls) > 1 and not head:
        raise click.UsageError("--gcs-url is given once to a node that joins (or not at all)")
    if len(gcs_urls) > 1:  # this process's children (drivers) are given the log's home
        os.environ[GCS_URL_ENV] = gcs_urls[0]
    if log_servers is not None:
        if not head:
            raise click.UsageError("--log-servers is for the head (it makes the GCS)")
        os.environ["CAIRN_LOG_SERVERS"] = str(log_servers)  # (the GCS reads it: settings.py)
    if gcs_replicas and not head:
        raise click.UsageError("--gcs-replicas is for the head (it runs the GCS)")
    if log_shards is not None:
        if not head:
            raise click.UsageError("--log-shards is for the head (it makes the GCS)")
        os.environ["CAIRN_LOG_SHARDS"] = str(log_shards)  # (the GCS reads it: settings.py)
    if gcs_replica_host is not None and not (head and gcs_replicas):
        raise click.UsageError("--gcs-replica-host is for a head with --gcs-replicas 1")
    if run_gcs_replica and head:
        raise click.UsageError(
            "--gcs-replica is for a node that joins (--address): the head runs the primary"
        )
    try:
        from controlplane.gcs import check_replicas

        check_replicas(gcs_replicas, external=head and bool(gcs_urls))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gcs-replicas") from None
    try:
        from controlplane.gcs import check_log_servers

        if head:
            check_log_servers(gcs_urls, log_servers or 1)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if disable_auth:
        if not auth.is_loopback(node_ip_address):
            raise click.UsageError(
                f"--disable-auth is for loopback-only development: it cannot be combined "
                f"with --node-ip-address {node_ip_address}"
            )
        click.echo(
            "WARNING: authentication is DISABLED (--disable-auth): any process on this "
            "machine can call this node and run code on the cluster. Development only.",
            err=True,
        )
    try:
        cluster_hosts = [node_ip_address, *([rpc.split_address(address)[0]] if address else [])]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--address") from None
    use_tls = tls.wanted(tls_mode, *cluster_hosts)
    if (gcs_replica_host or run_gcs_replica) and not use_tls:
        raise click.UsageError(
            "a GCS replica on another machine needs TLS between machines: give addresses "
            "that are not loopback, and not --tls off"
        )
    if use_tls and disable_auth:
        raise click.UsageError(
            "TLS needs the cluster token (it is derived from it to join): drop --disable-auth"
        )
    if tls_mode == "off" and not all(auth.is_loopback(h) for h in cluster_hosts):
        click.echo(
            "WARNING: TLS is OFF (--tls off): the cluster token, the GCS password, task code, "
            "arguments and objects cross the network in clear text.",
            err=True,
        )
    drawn = head and not disable_auth and not os.environ.get(auth.TOKEN_ENV)
    token = None if disable_auth else os.environ.get(auth.TOKEN_ENV) or None
    if drawn:  # a background start hands it to its --block process in the environment
        token = auth.new_token()
    try:
        custom = json.loads(resources) if resources else None
        if custom is not None and not isinstance(custom, dict):
            raise ValueError(f"--resources must be a JSON object, got {resources!r}")
        config = (
            local_node.NodeConfig(**json.loads(node_config))
            if node_config
            else local_node.node_config(
                num_cpus,
                num_gpus,
                custom,
                object_store_memory,
                memory,
                parse_labels_option(labels) if labels is not None else None,
            )
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    replica_plans = None
    if head:
        running = local_node.running_head()
        if running is not None:
            raise click.ClickException(
                f"a cluster is already running here (head pid {running.pid}, at "
                f"{running.address}): `cairn stop` it first"
            )
        port = rpc.DEFAULT_HEAD_PORT if port is None else port
    else:
        assert address is not None
        token = None if disable_auth else auth.find_token(address)
        joined, joined_tls = _join(address, token, node_ip_address, use_tls, run_gcs_replica)
        if joined.get("auth", True) != (not disable_auth):
            raise click.ClickException(
                f"the head at {address} runs with authentication "
                f"{'on' if joined.get('auth', True) else 'off (--disable-auth)'}: join it "
                f"{'without' if disable_auth else 'with'} --disable-auth, as the head"
            )
        gcs_url = joined["gcs_url"]
        port = 0 if port is None else port
        if run_gcs_replica:
            from controlplane.gcs_replica import ReplicaPlan

            if "gcs_replica" not in joined:
                why = joined.get("gcs_replica_refused", "it does not know of GCS replicas")
                raise click.ClickException(f"the head at {address} refused: {why}")
            replica_plans = [ReplicaPlan.from_dict(plan) for plan in joined["gcs_replica"]]
    role = local_node.ClusterRole(
        head=head,
        rpc_port=port,
        rpc_host=node_ip_address,
        auth_token=token,
        tls=use_tls,
        joined_tls=None if head else joined_tls,
        gcs_replica_host=gcs_replica_host,
        gcs_replica=replica_plans,
        dashboard_port=dashboard_port if head and include_dashboard else None,
        dashboard_host=dashboard_host,
    )
    if drawn and block:
        click.echo(_token_notice(token))
    if block:
        local_node.run_node(
            gcs_url, config, role, announce=click.echo, cluster=address, gcs_replicas=gcs_replicas
        )
        return
    try:
        node = local_node.start_in_background(gcs_url, config, role, address, gcs_replicas)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    if head:
        if drawn:
            click.echo(_token_notice(token))
        click.echo(
            f"Started a Cairn head node at {node.address} (session {node.session_dir}; "
            f"output in {local_node.node_log(node.pid)}).\n"
            f"Join nodes with `cairn start --address {node.address}`; connect drivers "
            'with sdk.init(address="auto"); `cairn status` shows the cluster, `cairn stop` '
            "stops this machine's nodes."
            + (
                "\nThe GCS has a synchronous replica; a watchdog promotes it if the primary "
                "is lost (once)."
                if gcs_replicas
                else ""
            )
        )
    else:
        click.echo(
            f"Started a Cairn node at {node.address}, joined to {address} (output in "
            f"{local_node.node_log(node.pid)})."
        )


def _join(
    address: str, token: str | None, node_ip_address: str, use_tls: bool, gcs_replica: bool
) -> tuple[dict[str, Any], JoinedTls | None]:
    """Asks the head at ``address`` for what joining needs; with TLS, a certificate for
    a key made here (which never leaves this machine); with ``gcs_replica``, the plan
    of the GCS replica this machine is to run."""
    request: dict[str, Any] | None = None
    key = tls.new_key()
    if use_tls:
        hosts = [node_ip_address, "127.0.0.1", "localhost"]
        request = {"csr": tls.signing_request(key, "cairn node").decode(), "hosts": hosts}
        request |= {"gcs_replica": True} if gcs_replica else {}
    try:
        joined = rpc.join(address, token, request=request)
    except (ValueError, ConnectionError, rpc.AuthError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not use_tls:
        return joined, None
    if not joined.get("tls") or "cert" not in joined:
        raise click.ClickException(f"the head at {address} did not issue a TLS certificate")
    from controlplane.local_node import JoinedTls

    return joined, JoinedTls(
        joined["ca"].encode(),
        joined["cert"].encode(),
        tls.key_pem(key),
        gcs=bool(joined.get("gcs_tls")),
    )


def _token_notice(token: str | None) -> str:
    return (
        f"Cluster token (shown once; stored owner-only in the session directory as "
        f"{auth.TOKEN_FILE}): {token}\nOn other machines, set {auth.TOKEN_ENV} to it before "
        "`cairn start --address`."
    )


@click.command()
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait per node.")
def stop(timeout: float) -> None:
    """Stop every Cairn node this machine runs (worker nodes first, then the head)."""
    from controlplane.node_records import stop_local_nodes

    for line in stop_local_nodes(timeout):
        click.echo(line)
