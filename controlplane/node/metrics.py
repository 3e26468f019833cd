"""The node's metrics, answered to the cluster's ``Metrics`` call (the head's
``/metrics``, controlplane/web/metrics.py, renders every node's): the user metrics its
processes report (``MetricsReport``, summed here per metric and tag set) and the
runtime's own, read at the call from what the node's parts already count, and from
/proc for the machine's CPU and memory. Nothing here runs per task."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataplane import protocol as p

if TYPE_CHECKING:
    from controlplane.node.parts import NodeParts

log = logging.getLogger("cairn.node")
Tags = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _Series:
    value: float = 0.0  # a counter's total, a gauge's last value, a histogram's sum
    buckets: list[int] = field(default_factory=list)  # a histogram's, not cumulative
    count: int = 0


@dataclass(slots=True)
class _Definition:
    kind: str
    description: str
    boundaries: tuple[float, ...]
    series: dict[Tags, _Series] = field(default_factory=dict)


class NodeMetrics:
    """The user metrics of this node's processes, totalled per (metric, tags); and the
    machine's CPU times at the last call (utilization is measured between calls)."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Definition] = {}
        self._refused: set[str] = set()  # names already warned about
        self._cpu_times: tuple[int, int] | None = None  # (busy, total) jiffies

    def received(self, points: list[p.MetricPoint]) -> None:
        for point in points:
            definition = self._metrics.get(point.name)
            if definition is None:
                definition = self._metrics[point.name] = _Definition(
                    point.kind, point.description, point.boundaries
                )
            elif (definition.kind, definition.boundaries) != (point.kind, point.boundaries):
                self._refuse(point, definition)
                continue
            series = definition.series.get(point.tags)
            if series is None:
                series = definition.series[point.tags] = _Series()
                series.buckets = [0] * len(point.buckets)
            if point.kind == "gauge":
                series.value = point.value
                continue
            series.value += point.value
            series.count += point.count
            for index, count in enumerate(point.buckets):
                series.buckets[index] += count

    def _refuse(self, point: p.MetricPoint, definition: _Definition) -> None:
        """A process records a metric under a name another defined otherwise: its
        values are not mixed in (the node's log says so, once per name)."""
        if point.name not in self._refused:
            self._refused.add(point.name)
            log.warning(
                "user metric %s is a %s with boundaries %s on this node; values recorded "
                "as a %s with boundaries %s are left out",
                point.name,
                definition.kind,
                definition.boundaries,
                point.kind,
                point.boundaries,
            )

    def user(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "kind": at.kind,
                "description": at.description,
                "boundaries": list(at.boundaries),
                "series": [
                    {
                        "tags": dict(tags),
                        "value": series.value,
                        "buckets": series.buckets,
                        "count": series.count,
                    }
                    for tags, series in at.series.items()
                ],
            }
            for name, at in self._metrics.items()
        ]

    def cpu_utilization(self) -> float:
        """The machine's CPU busy fraction since the last call (since boot the first
        time); 0.0 where /proc/stat cannot be read."""
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return 0.0
        jiffies = [int(f) for f in fields]
        idle = jiffies[3] + (jiffies[4] if len(jiffies) > 4 else 0)  # idle + iowait
        now = (sum(jiffies) - idle, sum(jiffies))
        before = self._cpu_times or (0, 0)
        self._cpu_times = now
        busy, total = now[0] - before[0], now[1] - before[1]
        return busy / total if total > 0 else 0.0


def memory() -> tuple[int, int]:
    """The machine's (used, total) memory in bytes, from /proc/meminfo ((0, 0) if it
    cannot be read): used is total less what is available."""
    values: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    total = values.get("MemTotal", 0)
    return total - values.get("MemAvailable", values.get("MemFree", 0)), total


def directory_bytes(path: Path) -> int:
    """The bytes of the files under ``path`` (0 if there is none)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # (freed meanwhile)
                continue
    return total


def snapshot(parts: NodeParts) -> dict[str, Any]:
    """What the ``Metrics`` call answers: the node's runtime metrics and its user
    metrics (names and meanings: docs/metrics.md)."""
    objects = parts.store.objects
    used, total = memory()
    follower = parts.remote_tasks.log_follower
    return {
        "node_id": parts.node_id,
        "address": parts.link.address if parts.link is not None else parts.socket_path,
        "runtime": {
            "tasks": {
                "RUNNING": parts.worker_pool.running_tasks(),
                "QUEUED": parts.scheduler.pending(),
                "WAITING_FOR_DEPENDENCIES": parts.tasks.waiting(),
            },
            "tasks_ended": dict(parts.runs.ended),
            "objects": len(objects),
            "object_store_used_bytes": objects.used,
            "object_store_capacity_bytes": objects.capacity,
            "spilled_bytes": directory_bytes(parts.store.spiller.spill_dir),
            "events_appended": parts.recorder.appender.events_committed,
            "event_backlog": parts.recorder.backlog,
            "log_follower_position": follower.position if follower is not None else None,
            "workers": len(parts.worker_pool),
            "actors": parts.actor_director.alive(),
            "cpu_count": os.cpu_count() or 0,
            "cpu_utilization": parts.metrics.cpu_utilization(),
            "memory_used_bytes": used,
            "memory_total_bytes": total,
        },
        "user": parts.metrics.user(),
    }
