"""An object's lineage as a tree (``cairn lineage``), from the rows of the SQL
function ``lineage(object_id)`` and each task's argument list in its ``submitted``
event."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

LINEAGE_QUERY = """
SELECT l.depth, l.object_id, l.task_id, l.function_name, l.node_id, l.submitted_at,
       (SELECT payload -> 'dependencies' FROM events
         WHERE entity_id = l.task_id AND event_type = 'submitted' AND entity_kind = 'task'
         ORDER BY position LIMIT 1) AS arguments
  FROM lineage($1) l
"""


async def object_lineage(
    url: str, object_id: str, *, without: Sequence[int] = ()
) -> dict[str, Any] | None:
    """The tree of an object, read-only from the log (None: the log never heard of
    it); ``cairn lineage`` and the dashboard show it. ``without``: servers of the log
    left out (``readonly_sql.audit_transaction``)."""
    from controlplane.readonly_sql import run_readonly
    from controlplane.sql import queries

    known = (await run_readonly(url, queries["object_known"], [object_id], without=without))[1]
    if not known[0][0]:
        return None
    columns, rows = await run_readonly(url, LINEAGE_QUERY, [object_id], without=without)
    return build([dict(zip(columns, row, strict=True)) for row in rows], object_id)


def build(rows: list[dict[str, Any]], object_id: str) -> dict[str, Any]:
    """The nested tree: each object with the task that made it and, under it, the
    task's argument objects (an object used twice appears under each user)."""
    by_object = {row["object_id"]: row for row in rows}

    def node(oid: str, seen: frozenset[str]) -> dict[str, Any]:
        row = by_object.get(oid, {})
        arguments = row.get("arguments")
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        tree: dict[str, Any] = {
            "object_id": oid,
            "task_id": row.get("task_id"),
            "function": row.get("function_name"),
            "node_id": row.get("node_id"),
            "submitted_at": row.get("submitted_at"),
        }
        if oid not in seen:
            tree["arguments"] = [node(a, seen | {oid}) for a in arguments or []]
        return tree

    return node(object_id, frozenset())


def render_tree(tree: dict[str, Any]) -> str:
    lines: list[str] = []

    def describe(item: dict[str, Any]) -> str:
        if item["task_id"] is None:
            return f"object {item['object_id']} (put)"
        made = f"made by {item['function'] or '?'} (task {item['task_id']}"
        where = f" on node {item['node_id']}" if item["node_id"] else ""
        when = f", submitted {item['submitted_at']}" if item["submitted_at"] else ""
        return f"object {item['object_id']} {made}{where}{when})"

    def walk(item: dict[str, Any], prefix: str, last: bool, root: bool) -> None:
        branch = "" if root else ("└── " if last else "├── ")
        lines.append(prefix + branch + describe(item))
        children = item.get("arguments", [])
        inner = prefix + ("" if root else ("    " if last else "│   "))
        for index, child in enumerate(children):
            walk(child, inner, index == len(children) - 1, False)

    walk(tree, "", True, True)
    return "\n".join(lines)
