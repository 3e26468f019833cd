"""The object store's summary, as text: what ``cairn memory`` prints and what
``memory_summary`` (at Ray's path, ``sdk._private.internal_api``) returns. It reads a
node's answer to ``MemorySummaryRequest``: one row per object it knows."""

from __future__ import annotations

from typing import Any

from dataplane import protocol as p
from dataplane.client import CoreClient

_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def ask(client: CoreClient) -> dict[str, Any]:
    summary: dict[str, Any] = client.request(lambda rid: p.MemorySummaryRequest(rid))
    return summary


def format_summary(
    summary: dict[str, Any],
    *,
    sort_by: str = "OBJECT_SIZE",
    units: str = "B",
    stats_only: bool = False,
    num_entries: int | None = None,
) -> str:
    """A table of the node's objects (largest first, or by id), then its totals."""
    if units not in _UNITS:
        raise ValueError(f"units must be one of {sorted(_UNITS)}, got {units!r}")
    if sort_by not in ("OBJECT_SIZE", "OBJECT_ID"):
        raise ValueError(f"sort_by must be OBJECT_SIZE or OBJECT_ID, got {sort_by!r}")
    unit = _UNITS[units]
    objects = list(summary["objects"])
    if sort_by == "OBJECT_SIZE":
        objects.sort(key=lambda o: (-o["size"], o["object_id"]))
    else:
        objects.sort(key=lambda o: o["object_id"])
    in_store = sum(o["size"] for o in objects if o["in_store"])
    lines = [f"======== Object store of node {summary['node_id']} ========"]
    if not stats_only:
        lines.append(f"{'object id':<42} {'state':<8} {'size (' + units + ')':>14} holders pins")
        for row in objects[:num_entries]:
            size = row["size"] / unit
            lines.append(
                f"{row['object_id']:<42} {row['state']:<8} {size:>14,.{0 if unit == 1 else 2}f} "
                f"{row['holders']:>7} {row['pins']:>4}"
            )
    lines.append(
        f"{len(objects)} objects; {summary['used'] / unit:,.2f} {units} of "
        f"{summary['capacity'] / unit:,.2f} {units} charged to the store "
        f"({in_store / unit:,.2f} {units} in shared memory, the rest inline)"
    )
    return "\n".join(lines)
