"""``ray._private.internal_api``, as far as Ray programs use it: ``memory_summary``
(the object stores of the cluster's live nodes, dataplane/memory_summary.py)."""

from __future__ import annotations

from typing import Any

from dataplane import memory_summary as summary
from sdk.runtime import client_or_auto_init


def memory_summary(
    address: Any = None,
    group_by: str = "NODE_ADDRESS",
    sort_by: str = "OBJECT_SIZE",
    units: str = "B",
    line_wrap: bool = True,
    stats_only: bool = False,
    num_entries: int | None = None,
) -> str:
    """Each live node's objects and store totals, then the cluster's, as text
    (``address`` and ``line_wrap`` are Ray's and change nothing: the summary is of the
    cluster this process is connected to)."""
    if group_by not in ("NODE_ADDRESS", "STACK_TRACE"):
        raise ValueError(f"group_by must be NODE_ADDRESS or STACK_TRACE, got {group_by!r}")
    answer = summary.ask(client_or_auto_init())
    return summary.format_summary(
        answer, sort_by=sort_by, units=units, stats_only=stats_only, num_entries=num_entries
    )
