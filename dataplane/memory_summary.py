"""The object stores' summary, as text: what ``cairn memory`` prints and what
``memory_summary`` (at Ray's path, ``sdk._private.internal_api``) returns. It reads a
node's answer to ``MemorySummaryRequest``: every live node's objects, one row each."""

from __future__ import annotations

from typing import Any

from dataplane import protocol as p
from dataplane.client import CoreClient

_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def ask(client: CoreClient) -> list[dict[str, Any]]:
    """Every live node's answer (this node's first); a node that did not answer is
    ``{"address": ..., "error": ...}``."""
    summary: dict[str, Any] = client.request(lambda rid: p.MemorySummaryRequest(rid))
    return list(summary["nodes"])


def format_summary(
    nodes: list[dict[str, Any]],
    *,
    sort_by: str = "OBJECT_SIZE",
    units: str = "B",
    stats_only: bool = False,
    num_entries: int | None = None,
) -> str:
    """Per node, a table of its objects (largest first, or by id) and its totals; then
    the cluster's totals."""
    if units not in _UNITS:
        raise ValueError(f"units must be one of {sorted(_UNITS)}, got {units!r}")
    if sort_by not in ("OBJECT_SIZE", "OBJECT_ID"):
        raise ValueError(f"sort_by must be OBJECT_SIZE or OBJECT_ID, got {sort_by!r}")
    unit = _UNITS[units]
    lines: list[str] = []
    answered = [node for node in nodes if "error" not in node]
    for node in nodes:
        if "error" in node:
            lines.append(
                f"======== Node at {node['address']}: no answer ({node['error']}) ========"
            )
            continue
        lines += _node_lines(node, sort_by, units, unit, stats_only, num_entries)
    used = sum(node["used"] for node in answered)
    capacity = sum(node["capacity"] for node in answered)
    count = sum(len(node["objects"]) for node in answered)
    lines.append(
        f"--- Cluster: {len(answered)} nodes, {count} objects; {used / unit:,.2f} {units} of "
        f"{capacity / unit:,.2f} {units} charged to the stores ---"
    )
    return "\n".join(lines)


def _node_lines(
    node: dict[str, Any],
    sort_by: str,
    units: str,
    unit: int,
    stats_only: bool,
    num_entries: int | None,
) -> list[str]:
    objects = list(node["objects"])
    if sort_by == "OBJECT_SIZE":
        objects.sort(key=lambda o: (-o["size"], o["object_id"]))
    else:
        objects.sort(key=lambda o: o["object_id"])
    in_store = sum(o["size"] for o in objects if o["in_store"])
    lines = [
        f"======== Object store of node {node['node_id']} ({node.get('address', '')}) ========"
    ]
    if not stats_only:
        lines.append(f"{'object id':<42} {'state':<8} {'size (' + units + ')':>14} holders pins")
        for row in objects[:num_entries]:
            size = row["size"] / unit
            lines.append(
                f"{row['object_id']:<42} {row['state']:<8} {size:>14,.{0 if unit == 1 else 2}f} "
                f"{row['holders']:>7} {row['pins']:>4}"
            )
    lines.append(
        f"{len(objects)} objects; {node['used'] / unit:,.2f} {units} of "
        f"{node['capacity'] / unit:,.2f} {units} charged to the store "
        f"({in_store / unit:,.2f} {units} in shared memory, the rest inline)"
    )
    return lines
