"""The event log: event shapes, the catalog of event types, the batching appender, the
tailer, and partition management."""

from controlplane.eventlog.appender import EventAppender, FailureLog
from controlplane.eventlog.events import (
    EVERY_NODE,
    SCHEDULER,
    EntityKind,
    Event,
    RecordedEvent,
    new_event_id,
)
from controlplane.eventlog.servers import (
    LogAppender,
    LogTailer,
    log_head_positions,
    open_appender,
    open_tailer,
)
from controlplane.eventlog.tailer import Tailer, head_positions

__all__ = [
    "EVERY_NODE",
    "SCHEDULER",
    "EntityKind",
    "Event",
    "EventAppender",
    "FailureLog",
    "LogAppender",
    "LogTailer",
    "RecordedEvent",
    "Tailer",
    "head_positions",
    "log_head_positions",
    "new_event_id",
    "open_appender",
    "open_tailer",
]
