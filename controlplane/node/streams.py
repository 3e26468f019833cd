"""Generator tasks and calls (``num_returns="streaming"``), on the node that runs them.

A generator's i-th value is the object ``return_object_id(task_id, i)``. The worker
stores each value as it is yielded and sends it (``StreamItem``); the node logs its
``created`` event and, once that is durable, makes it ready for the caller, who holds
it from then on. After the last value comes an end-of-stream marker: an object that
stands for the error kind ``END_OF_STREAM``, which the caller's generator reads as
``StopIteration``. A generator that raises (or whose task fails) ends with the error
as its next value, then the marker, as in Ray.

A retried or rebuilt attempt yields from the start again: values are matched by index,
so one an earlier attempt made is dropped. A caller that drops its generator lets go
of the values it never took (``release``): those already made, and those to come."""

from __future__ import annotations

from controlplane.eventlog import Event
from controlplane.node.object_store import ObjectStore
from controlplane.node.task_table import TaskRecord
from dataplane import protocol as p


class Streams:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.objects = store.objects

    def item(self, record: TaskRecord, item: p.StreamItem) -> None:
        """A value the generator yielded (or the error it raised there)."""
        location = item.location
        if record.attempt != item.attempt or item.index < record.streamed:
            self.store.discard([location])  # a stale attempt's, or one made already
            return
        record.streamed = item.index + 1
        record.stream_errored = location.error is not None
        events: list[Event] = []
        if location.error is None:
            if location.region is None:
                self.objects.charge(location.size, force=True)
            spec = record.spec
            events.append(self.store.created_event(location, spec.task_id, spec.job_id))
        self._publish(record, location, events)

    def end(self, record: TaskRecord, events: list[Event], error: p.ErrorInfo | None) -> None:
        """The generator is over, with ``events`` (its ``finished`` or ``failed``): a
        task that failed before it could say so itself (its worker died, it was
        cancelled queued) gets ``error`` as its next value; then the marker."""
        task_id = record.spec.task_id
        if error is not None and not record.stream_errored:
            failed = p.ObjectLocation(p.return_object_id(task_id, record.streamed), error=error)
            record.streamed += 1
            self._publish(record, failed, [])
        marker = p.ObjectLocation(
            p.return_object_id(task_id, record.streamed),
            error=p.ErrorInfo(
                p.END_OF_STREAM, f"the generator {record.spec.name} has no more values"
            ),
        )
        self._publish(record, marker, events)

    def release(self, record: TaskRecord | None, index: int) -> None:
        """The caller dropped its generator at ``index``: values from there on that are
        still to come are not held for it (those made are released by the caller)."""
        if record is not None:
            record.stream_held_below = min(record.stream_held_below, index)

    def _publish(self, record: TaskRecord, location: p.ObjectLocation, events: list[Event]) -> None:
        owner = record.submitter
        if owner is not None and p.return_index(location.object_id) < record.stream_held_below:
            owner.holding.add(location.object_id)
            self.objects.hold(location.object_id)
        else:
            owner = None
        self.store.make_durable_then_ready([location], events, owner)
