"""A process's clock over a log on several servers: the highest position it has seen,
read or appended, on any of them. Its appends take positions past it
(migrations/sql/0021_log_servers.up.sql), so what it appends after seeing an event has a
higher position than that event, whichever servers the two lie on: a Lamport clock."""

from __future__ import annotations

import threading


class LogClock:
    def __init__(self, position: int = 0) -> None:
        self._lock = threading.Lock()
        self._position = position

    @property
    def position(self) -> int:
        return self._position

    def saw(self, position: int) -> None:
        with self._lock:
            if position > self._position:
                self._position = position


# The clock of this process: every appender and reader of a log on several servers that
# the process opens (``servers.open_appender``, ``open_tailer``) keeps it.
PROCESS_CLOCK = LogClock()


class AppendBound:
    """A node's bound on the log's other servers (migrations/sql/0032_append_bounds.up.sql):
    the position its appends there must stay below, renewed by its pings to server 0
    (``membership.LivenessPinger``). None until the first: no bound is passed then."""

    def __init__(self, position: int | None = None) -> None:
        self._lock = threading.Lock()
        self._position = position

    @property
    def position(self) -> int | None:
        return self._position

    def renewed(self, position: int) -> None:
        with self._lock:
            if self._position is None or position > self._position:
                self._position = position


_NODE_BOUNDS: dict[str, AppendBound] = {}
_NODE_BOUNDS_LOCK = threading.Lock()


def node_bound(node_id: str) -> AppendBound:
    """The bound of a node this process runs: its pinger renews it, its recorder's
    appends to the servers other than server 0 pass it."""
    with _NODE_BOUNDS_LOCK:
        return _NODE_BOUNDS.setdefault(node_id, AppendBound())
