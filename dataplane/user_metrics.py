"""What this process recorded of its user metrics (``sdk.util.metrics``), folded here
and sent to the node in one ``MetricsReport`` about once a second by the client's
background flusher (dataplane/client.py): recording a value is a dict update under a
lock, never a message. The node keeps the totals (controlplane/node/metrics.py)."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

from dataplane import protocol as p

REPORT_INTERVAL_S = 1.0

# (kind, name, sorted tags, boundaries): a name defined two ways is two entries (the node
# keeps the first it hears of)
Key = tuple[str, str, tuple[tuple[str, str], ...], tuple[float, ...]]


@dataclass(slots=True)
class _Pending:
    kind: str
    description: str
    boundaries: tuple[float, ...]
    value: float = 0.0
    buckets: list[int] = field(default_factory=list)
    count: int = 0


class MetricsBuffer:
    """Values recorded since the last ``take``, one entry per (metric, tags)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[Key, _Pending] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def record(
        self,
        kind: str,
        name: str,
        description: str,
        tags: dict[str, str],
        value: float,
        boundaries: tuple[float, ...] = (),
    ) -> None:
        key = (kind, name, tuple(sorted(tags.items())), boundaries)
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = _Pending(kind, description, boundaries)
                if kind == "histogram":
                    pending.buckets = [0] * (len(boundaries) + 1)
            if kind == "gauge":
                pending.value = value
            else:
                pending.value += value
            if kind == "histogram":
                # Prometheus' buckets are upper bounds, inclusive ("le")
                pending.buckets[bisect.bisect_left(boundaries, value)] += 1
                pending.count += 1

    def take(self) -> list[p.MetricPoint]:
        """What was recorded since the last call (and forgets it)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return [
            p.MetricPoint(
                at.kind,
                name,
                at.description,
                tags,
                at.value,
                at.boundaries,
                tuple(at.buckets),
                at.count,
            )
            for (_kind, name, tags, _boundaries), at in pending.items()
        ]


BUFFER = MetricsBuffer()  # this process's
