"""The node's one way into the log: every event of a node daemon is appended here, by
one appender, so they commit in the order the daemon made them (see daemon.py,
"Durability before visibility"): once an event that gates visibility is durable, so is
every event written behind before it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from controlplane.errors import GcsError, GcsIdentityError, NodeFencedError
from controlplane.eventlog import Event, EventAppender, FailureLog
from controlplane.eventlog.servers import LogAppender, ServersAppender, open_appender

log = logging.getLogger("cairn.node")
# how long events written behind wait for the commit of urgent ones that follow them
LINGER_S = 0.005
FINAL_FLUSH_TIMEOUT_S = 5.0
_failure_log = FailureLog(log, "node daemon: events")


class EventRecorder:
    """Appends the node's events: written behind (``log``) or gating what waits on
    them (``log_durable``). A cluster member appends fenced (``writer_node``): once the
    node is declared dead, its appends are refused."""

    def __init__(self, gcs_url: str, *, writer_node: str | None) -> None:
        self._url = gcs_url
        self._writer_node = writer_node
        # until start(): one server's, which holds the callbacks given (the log's own
        # appender, on one server or several, takes them then)
        self.appender: LogAppender = EventAppender(gcs_url)

    @property
    def unavailable_timeout(self) -> float:
        return self.appender.unavailable_timeout

    def server_of_job(self, job_id: str) -> int:
        """The server of the log a job's events go to (0 on a log of one server)."""
        appender = self.appender
        return appender.server_of_job(job_id) if isinstance(appender, ServersAppender) else 0

    @property
    def backlog(self) -> int:
        """Events queued, not yet committed."""
        return self.appender.backlog

    def on_refused(self, callback: Callable[[GcsIdentityError], None]) -> None:
        """``callback`` hears that the GCS is not this node's log any more."""
        self.appender.on_refused = callback

    def on_fenced(self, callback: Callable[[NodeFencedError], None]) -> None:
        """``callback`` hears that the node was declared dead (its appends refused)."""
        self.appender.on_fenced = callback

    async def start(self) -> None:
        appender = await open_appender(self._url, linger=LINGER_S, writer_node=self._writer_node)
        appender.on_refused = self.appender.on_refused
        appender.on_fenced = self.appender.on_fenced
        self.appender = appender
        await self.appender.start()

    def log(self, events: list[Event]) -> None:
        """Appends events written behind: they wait up to LINGER_S for the commit of
        the urgent events that follow them."""
        with contextlib.suppress(GcsError):  # closed: the daemon is shutting down
            self.appender.write_behind(events)

    def log_durable(self, events: list[Event], *, urgent: bool = True) -> asyncio.Future[list[int]]:
        """Appends events that gate visibility: committed at once (or, not ``urgent``,
        within the linger); the future is done when they are durable."""
        try:
            future = self.appender.enqueue(events, urgent=urgent)
        except GcsError as error:  # closed: the daemon is shutting down
            future = asyncio.get_running_loop().create_future()
            future.set_exception(error)
        future.add_done_callback(_report_failure)
        return future

    async def caught_up(self) -> None:
        """Returns once the backlog is under the appender's bound (at once if it is):
        the daemon stops reading its clients meanwhile, so that they wait on their
        sockets instead of events piling up in memory."""
        if self.appender.backlog > self.appender.max_backlog:
            await self.appender.below_backlog()

    async def close(self) -> None:
        """Commits what is queued, for at most FINAL_FLUSH_TIMEOUT_S (the GCS may be
        gone already: it dies with the driver that started it)."""
        try:
            await asyncio.wait_for(self.appender.close(), FINAL_FLUSH_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "node daemon: the GCS did not take the last events within %ss",
                FINAL_FLUSH_TIMEOUT_S,
            )


def _report_failure(future: asyncio.Future[list[int]]) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        _failure_log(error)
