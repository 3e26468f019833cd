"""``/metrics``: every live node's metrics in Prometheus' text format, one exposition
with a ``node_id`` and ``NodeAddress`` label on each series (names and meanings:
docs/metrics.md). The nodes are found in the log and each is asked over gRPC (its
``Metrics`` call, controlplane/node/metrics.py); ``cairn metrics`` prints the same."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from controlplane import tls
from controlplane.eventlog.connection import connect
from controlplane.membership import cluster_nodes
from controlplane.node import rpc
from controlplane.sql import queries
from controlplane.web.app import context_of

NODE_TIMEOUT_S = 5.0
USER_PREFIX = "ray_"  # as Ray exports its users' metrics

# runtime metrics read from a node's answer: (name, type, help, key in "runtime")
_RUNTIME = (
    ("cairn_objects", "gauge", "Objects in the node's store.", "objects"),
    (
        "cairn_object_store_used_bytes",
        "gauge",
        "Bytes of the node's object store in use.",
        "object_store_used_bytes",
    ),
    (
        "cairn_object_store_capacity_bytes",
        "gauge",
        "The node's object store size (object_store_memory).",
        "object_store_capacity_bytes",
    ),
    (
        "cairn_spilled_bytes",
        "gauge",
        "Bytes of objects spilled to the node's disk.",
        "spilled_bytes",
    ),
    (
        "cairn_events_appended",
        "counter",
        "Events the node appended to the log since its daemon started.",
        "events_appended",
    ),
    (
        "cairn_event_backlog",
        "gauge",
        "Events the node queued for the log, not committed yet.",
        "event_backlog",
    ),
    ("cairn_workers", "gauge", "Worker processes of the node.", "workers"),
    ("cairn_actors", "gauge", "Live actors the node holds.", "actors"),
    ("cairn_node_cpu_count", "gauge", "CPUs of the node's machine.", "cpu_count"),
    (
        "cairn_node_cpu_utilization",
        "gauge",
        "Busy fraction of the machine's CPUs (0 to 1) since the previous scrape.",
        "cpu_utilization",
    ),
    (
        "cairn_node_mem_used_bytes",
        "gauge",
        "Memory in use on the node's machine (total less available).",
        "memory_used_bytes",
    ),
    (
        "cairn_node_mem_total_bytes",
        "gauge",
        "Memory of the node's machine.",
        "memory_total_bytes",
    ),
)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", _metrics)


async def _metrics(request: web.Request) -> web.Response:
    context = context_of(request)
    node_tls = tls.NodeTls.find(context.session_dir) if context.session_dir else None
    try:
        body = await exposition(context.gcs_url, context.auth_token, node_tls)
    except Exception as exc:  # (the log is unreachable, ...: the answer says so)
        return web.Response(status=503, text=f"cannot read the cluster's metrics: {exc}\n")
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def exposition(gcs_url: str, token: str | None, node_tls: tls.NodeTls | None) -> bytes:
    """The cluster's metrics, every live node asked at once (``token``: the cluster's,
    None: found as ``rpc.call`` finds it; ``node_tls``: a node's certificate, for a
    cluster that runs TLS)."""
    conn = await connect(gcs_url, fence=False)
    try:
        head = int(await conn.fetchval(queries["head_position"]))
        stored = {
            r["tailer"]: int(r["position"])
            for r in await conn.fetch(queries["stored_tailer_positions"])
        }
    finally:
        await conn.close()
    live = [
        (row["node_id"], str(row["address"]))
        for row in await cluster_nodes(gcs_url)
        if row["state"] == "ALIVE" and str(row["address"] or "").rpartition(":")[2].isdigit()
    ]
    answers = await asyncio.gather(
        *(asyncio.to_thread(_ask, node_id, address, token, node_tls) for node_id, address in live)
    )
    return render(list(answers), head, stored)


def _ask(
    node_id: str, address: str, token: str | None, node_tls: tls.NodeTls | None
) -> dict[str, Any]:
    try:
        return rpc.call(address, "Metrics", {}, NODE_TIMEOUT_S, token, secure=node_tls)
    except (ConnectionError, rpc.AuthError) as exc:
        return {"node_id": node_id, "address": address, "error": str(exc)}


class _Families(Collector):
    """The exposition's metric families, each once, in the order first seen."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}

    def get(self, name: str, kind: str, documentation: str) -> Metric | None:
        """The family ``name`` (None if it was made with another type: a user metric
        defined otherwise on another node is left out rather than mixed in)."""
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = Metric(name, documentation or name, kind)
        return family if family.type == kind else None

    def collect(self) -> Iterator[Metric]:
        return iter(self.families.values())


def render(
    nodes: list[dict[str, Any]], head_position: int, stored: dict[str, int] | None = None
) -> bytes:
    """One exposition of the nodes' answers (``head_position``: the log's head when
    they were asked, to measure each node's log follower against; ``stored``: the
    positions the log's other readers keep in it, by name)."""
    out = _Families()
    for tailer, position in (stored or {}).items():
        _lag(out).add_sample(
            "cairn_tailer_lag_events", {"tailer": tailer}, float(max(0, head_position - position))
        )
    for node in nodes:
        labels = {"node_id": node["node_id"], "NodeAddress": _host(node["address"])}
        up = out.get("cairn_node_up", "gauge", "1 if the node answered the scrape, else 0.")
        assert up is not None
        up.add_sample("cairn_node_up", labels, 0.0 if "error" in node else 1.0)
        if "error" not in node:
            _add_runtime(out, labels, node["runtime"], head_position)
            _add_user(out, labels, node["user"])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(out)
    return generate_latest(registry)


def _host(address: str) -> str:
    return address.rpartition(":")[0].strip("[]") or address


def _add_runtime(
    out: _Families, labels: dict[str, str], runtime: dict[str, Any], head: int
) -> None:
    tasks = out.get("cairn_tasks", "gauge", "Tasks and actor calls on the node, by state.")
    assert tasks is not None
    for state, count in runtime["tasks"].items():
        tasks.add_sample("cairn_tasks", {**labels, "state": state}, float(count))
    ended = out.get(
        "cairn_tasks_ended", "counter", "Tasks and actor calls that ended on the node, by state."
    )
    assert ended is not None
    for state, count in runtime["tasks_ended"].items():
        ended.add_sample("cairn_tasks_ended_total", {**labels, "state": state}, float(count))
    for name, kind, documentation, key in _RUNTIME:
        family = out.get(name, kind, documentation)
        assert family is not None
        sample = f"{name}_total" if kind == "counter" else name
        family.add_sample(sample, labels, float(runtime[key]))
    position = runtime["log_follower_position"]
    if position is not None:
        _lag(out).add_sample(
            "cairn_tailer_lag_events",
            {**labels, "tailer": "node_log_follower"},
            float(max(0, head - int(position))),
        )


def _lag(out: _Families) -> Metric:
    lag = out.get(
        "cairn_tailer_lag_events",
        "gauge",
        "Events between the log's head and where a reader of the log stands (a node's "
        "follower; a projection; a checkpointing reader, as of its last checkpoint).",
    )
    assert lag is not None
    return lag


def _add_user(out: _Families, labels: dict[str, str], metrics: list[dict[str, Any]]) -> None:
    for metric in metrics:
        name = USER_PREFIX + metric["name"]
        family = out.get(name, metric["kind"], metric["description"])
        if family is None:
            continue
        for series in metric["series"]:
            tagged = {**series["tags"], **labels}
            if metric["kind"] == "counter":
                family.add_sample(f"{name}_total", tagged, series["value"])
            elif metric["kind"] == "gauge":
                family.add_sample(name, tagged, series["value"])
            else:
                _add_histogram(family, name, tagged, metric["boundaries"], series)


def _add_histogram(
    family: Metric,
    name: str,
    labels: dict[str, str],
    boundaries: list[float],
    series: dict[str, Any],
) -> None:
    cumulative = 0
    for bound, count in zip([*boundaries, float("inf")], series["buckets"], strict=True):
        cumulative += count
        family.add_sample(
            f"{name}_bucket", {**labels, "le": floatToGoString(bound)}, float(cumulative)
        )
    family.add_sample(f"{name}_count", labels, float(series["count"]))
    family.add_sample(f"{name}_sum", labels, series["value"])
