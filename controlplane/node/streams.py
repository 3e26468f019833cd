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
of the values it never took (``release``): those already made, and those to come.

A generator spilled to another node (remote_tasks.py) runs there like a task placed
there: each value's ``created`` event carries it (small) or that node's address, and
that node keeps it for the caller's node, which follows the log and hands each value
to the caller as its event comes (``relayed``), in the order it was yielded; the
generator's ``finished`` or ``failed`` event ends it there."""

from __future__ import annotations

from typing import TYPE_CHECKING

from controlplane.eventlog import Event
from controlplane.node.object_store import ObjectStore
from controlplane.node.task_table import TaskRecord
from dataplane import protocol as p
from dataplane.object_table import Elsewhere

if TYPE_CHECKING:
    from controlplane.node.remote_tasks import RemoteTasks


class Streams:
    remote: RemoteTasks  # (given once made: TaskRuns.wire)

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
        rebuilding = record.stream_rebuilding
        if rebuilding is not None and location.object_id not in rebuilding:
            self.store.discard([location])  # a rebuild: one that was not lost
            return
        record.stream_errored = location.error is not None
        events: list[Event] = []
        if location.error is None:
            if location.region is None:
                self.objects.charge(location.size, force=True)
            spec = record.spec
            placed = record.placed_from is not None  # (for a caller on another node)
            events.append(
                self.store.created_event(
                    location,
                    spec.task_id,
                    spec.job_id,
                    data=location.inline if placed else None,
                    kept_at=self.remote.address if placed else None,
                    owner_node=record.owner_node if placed else None,
                )
            )
        self._publish(record, location, events)

    def relayed(self, record: TaskRecord, location: p.ObjectLocation) -> bool:
        """A value the generator yielded on another node (its ``created`` event, read
        from the log): its bytes inline, or left there (``location.remote``) until
        wanted here. False if nobody here will have it (made by an earlier attempt,
        or its caller dropped the generator): that node's copy may go."""
        index = p.return_index(location.object_id)
        owner = record.submitter
        if index < record.streamed or owner is None or index >= record.stream_held_below:
            return False
        record.streamed, record.stream_errored = index + 1, False
        owner.holding.add(location.object_id)
        self.objects.hold(location.object_id)
        if location.remote is not None:
            where = Elsewhere("remote", location.remote, location)
            self.objects.set_elsewhere(location.object_id, where)
        else:
            self.objects.charge(location.size, force=True)
            self.objects.ready(location)
        owner.send(p.ObjectsReady([location]))
        return True

    def end(self, record: TaskRecord, events: list[Event], error: p.ErrorInfo | None) -> None:
        """The generator is over, with ``events`` (its ``finished`` or ``failed``): a
        task that failed before it could say so itself (its worker died, it was
        cancelled queued) gets ``error`` as its next value; then the marker."""
        task_id = record.spec.task_id
        if record.stream_rebuilding is not None:
            self._rebuilt(record, events, error)
            return
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

    def _rebuilt(self, record: TaskRecord, events: list[Event], error: p.ErrorInfo | None) -> None:
        """A re-run for lost values is over: those it did not yield again (it failed
        first, or yields otherwise than it did) stand for why, as in Ray."""
        assert record.stream_rebuilding is not None
        if error is None:
            error = p.ErrorInfo(
                "generator_replay_inconsistent",
                f"the generator {record.spec.name}, re-run to rebuild a lost value, yielded "
                f"only {record.streamed} values this time",
                record.spec.name,
            )
        missing = [
            p.ObjectLocation(object_id, error=error)
            for object_id in sorted(record.stream_rebuilding)
            if p.return_index(object_id) >= record.streamed
        ]
        self.store.make_durable_then_ready(missing, events, None)

    def release(self, record: TaskRecord | None, index: int) -> None:
        """The caller dropped its generator at ``index``: values from there on that are
        still to come are not held for it (those made are released by the caller)."""
        if record is not None:
            record.stream_held_below = min(record.stream_held_below, index)

    def _publish(self, record: TaskRecord, location: p.ObjectLocation, events: list[Event]) -> None:
        owner = record.submitter
        if record.placed_from is not None:  # kept for the caller's node until it has it
            if location.error is None:
                self.remote.keep_for_owner(location.object_id)
            owner = None
        elif owner is not None and p.return_index(location.object_id) < record.stream_held_below:
            owner.holding.add(location.object_id)
            self.objects.hold(location.object_id)
        else:
            owner = None
        self.store.make_durable_then_ready([location], events, owner)
