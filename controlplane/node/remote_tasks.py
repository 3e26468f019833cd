"""The node's tasks across the cluster: spilling tasks it cannot run now, running tasks
placed on it, and taking back the results of the tasks it spilled -- all through the
log, with object bytes moved over gRPC (dataplane/transfer.py).

- **Spill** (the local scheduler's hand-off, spilled_tasks.py): a task whose resources
  are not free here, once its arguments are ready, gets a ``spilled`` event carrying
  its spec (and code) and where its argument objects are; a global scheduler places it
  with a ``placed`` event (scheduler.py).
- **Placed here**: the daemon follows the log; a task placed on this node has its
  argument objects pulled from the node that spilled it, then runs like a local task.
  Its return objects' ``created`` events carry small values inline (in the event's
  data) and this node's address otherwise, and come before its ``finished``; this node
  keeps them until the spilling node says it has its copy (``Release``).
- **Back home**: the spilling node, following the log, takes the values from the
  ``created`` events (pulling large ones), logs where its copy is (``transferred``),
  and hands them to the submitter as if the task had run here.

``RemoteTasks`` follows the log for the tasks this node spilled (``SpilledTasks`` holds
them until their results are back); it owns the values of their returns seen in the
log, the objects being fetched from other nodes and those kept here for their owner.
Every cluster daemon reads the whole log: fine for a handful of nodes; a filtered feed
per node is the way to many.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

from controlplane.eventlog import EntityKind, Event, LogTailer, RecordedEvent, open_tailer
from controlplane.labels import node_labels
from controlplane.membership import RESTARTED_CAUSE, cluster_nodes
from controlplane.node.actors import ActorDirector
from controlplane.node.actors_elsewhere import ActorsElsewhere
from controlplane.node.cluster_link import ClusterLink
from controlplane.node.local_scheduler import LocalScheduler
from controlplane.node.object_store import ObjectStore
from controlplane.node.placement_groups import PlacementGroups
from controlplane.node.reconstruction import Reconstructor
from controlplane.node.recorder import EventRecorder
from controlplane.node.spilled_tasks import SpilledTasks
from controlplane.node.task_table import TaskRecord, TaskTable
from dataplane import protocol as p
from dataplane.object_table import Elsewhere
from dataplane.transfer import Puller, TransferError

log = logging.getLogger("cairn.node")
K = EntityKind
_PULL_ATTEMPTS = 3  # of an argument a task placed here needs, before it fails


class TaskHost(Protocol):
    """What the node's tasks across the cluster ask of the node."""

    def enqueue(self, record: TaskRecord) -> None: ...

    def retry(self, record: TaskRecord, reason: str) -> None: ...

    def finish_failed(self, record: TaskRecord, error: p.ErrorInfo, *, log_event: bool) -> None: ...

    def relay_stream_item(self, record: TaskRecord, location: p.ObjectLocation) -> bool: ...

    def end_relayed_stream(self, record: TaskRecord) -> None: ...

    def finished_event(self, record: TaskRecord) -> Event: ...

    def task_over(self, record: TaskRecord) -> None: ...


class RemoteTasks:
    def __init__(
        self,
        node_id: str,
        gcs_url: str,
        recorder: EventRecorder,
        store: ObjectStore,
        tasks: TaskTable,
        scheduler: LocalScheduler,
        placement_groups: PlacementGroups,
        spills: SpilledTasks,
        actors: ActorDirector,
        elsewhere: ActorsElsewhere,
        reconstructor: Reconstructor,
        puller: Puller,
        link: ClusterLink | None,
        node: TaskHost,
        *,
        socket_path: str,
        head: bool,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        """``link``: None for a private cluster (``sdk.init()``), which is this node alone."""
        self.node_id = node_id
        self.gcs_url = gcs_url
        self.recorder = recorder
        self.store = store
        self.objects = store.objects
        self.tasks = tasks
        self.scheduler = scheduler
        self.placement_groups = placement_groups
        self.spills = spills
        self.actor_director = actors
        self.elsewhere = elsewhere
        self.reconstructor = reconstructor
        self.puller = puller
        self.link = link
        self.node = node
        self.socket_path = socket_path
        self.head = head
        self._spawn = spawn
        # task id -> object id -> (its value when small enough to be in the log, else
        # where it is (``remote``); the address of the node holding it)
        self.remote_returns: dict[str, dict[str, tuple[p.ObjectLocation, str]]] = {}
        self.fetching: set[str] = set()  # objects pulled here because something wants them
        self.kept_for_owner: set[str] = set()  # objects of placed tasks, until their owner has them
        self.log_follower: LogTailer | None = None  # the node's tailer, once it follows the log

    @property
    def address(self) -> str:
        """host:port of the node's gRPC service ("" outside a cluster, or before)."""
        return self.spills.address

    # -- following the log ---------------------------------------------------------

    async def follow_log(self, after: list[int]) -> None:
        async with await open_tailer(
            self.gcs_url, reader=self.node_id, after=after, poll_interval=0.5
        ) as tailer:
            self.log_follower = tailer  # (its position: the node's metrics)
            while True:
                for event in await tailer.read():
                    self._on_log_event(event)

    def _on_log_event(self, event: RecordedEvent) -> None:
        kind, kind_type = event.entity_kind, event.event_type
        if kind is K.NODE and event.entity_id != self.node_id:
            if self.link is not None and self.link.node_event(event):  # a node died
                self._node_lost(event.entity_id, str(event.payload.get("cause", "")))
        elif kind is K.ACTOR and event.node_id != self.node_id:
            if event.entity_id in self.elsewhere:
                self.elsewhere.remote_event(event)
            else:
                self.actor_director.remote_event(event)
        elif kind is K.TASK and kind_type == "forwarded":
            if event.payload["to_node"] == self.node_id:
                self._call_from_elsewhere(event)
        elif kind is K.PLACEMENT_GROUP and kind_type in (
            "placed",
            "bundle_reserved",
            "removed",
            "infeasible",
        ):
            self.placement_groups.on_log_event(event)
        elif kind is K.TASK and kind_type == "placed":
            if event.payload["node_id"] == self.node_id:
                self._run_placed(event)
            elif (record := self.spills.get(event.entity_id)) is not None:
                record.placed_on = event.payload["node_id"]
                if record.spec.method == "__init__":
                    self.elsewhere.placed(record, event.payload["node_id"])
                node = record.placed_on
                if self.link is not None and self.link.is_dead_peer(node):  # known, now dead
                    # placed by a scheduler that had not read the node's death yet: the
                    # node will never run it, so it is lost with the node, as if placed
                    # just before it died
                    self._placed_on_dead_node(record, node)
        elif kind is K.OBJECT and kind_type == "created":
            task_id = str(event.payload.get("task_id") or "")
            if task_id in self.spills and event.node_id != self.node_id:
                address = event.payload["address"]
                contained = tuple(event.payload.get("contained", ()))
                value = (
                    p.ObjectLocation(
                        event.entity_id,
                        inline=event.data,
                        size=len(event.data),
                        contained=contained,
                    )
                    if event.data is not None
                    else p.ObjectLocation(
                        event.entity_id,
                        size=int(event.payload["size_bytes"]),
                        remote=address,
                        contained=contained,
                    )
                )
                record = self.spills.get(task_id)
                if record is not None and record.spec.streaming:
                    self._relay(record, value, address)
                else:
                    self.remote_returns.setdefault(task_id, {})[event.entity_id] = (value, address)
        elif kind is K.TASK and (record := self.spills.get(event.entity_id)) is not None:
            if event.node_id == self.node_id:
                return  # this node's own events about it (e.g. spilled)
            if kind_type == "finished":
                self.spills.forget(event.entity_id)
                if record.spec.streaming:
                    self.node.end_relayed_stream(record)
                else:
                    self._spawn(self._take_back(record))
            elif kind_type == "infeasible" and not event.payload.get("final"):
                if record.submitter is not None:  # as Ray, the driver is warned
                    record.submitter.send(
                        p.Notice(
                            f"task {record.spec.name} ({event.entity_id}) cannot be scheduled "
                            f"now: {event.payload.get('reason', '')}; it waits for a node that "
                            "can run it"
                        )
                    )
            elif kind_type == "infeasible" and event.payload.get("final"):
                self.spills.forget(event.entity_id)
                self.node.finish_failed(
                    record,
                    p.ErrorInfo("unschedulable", event.payload.get("reason", ""), record.spec.name),
                    log_event=True,
                )
            elif kind_type in ("failed", "cancelled"):
                self.spills.forget(event.entity_id)
                self.remote_returns.pop(event.entity_id, None)
                error_kind, _, message = event.payload.get("error", "").partition(": ")
                if (
                    error_kind == "object_lost"
                    and record.spec.actor_id is None
                    and record.retries_left != 0
                ):  # its node could not get an argument: this node has (or rebuilds) it
                    record.placed_on = None
                    self.node.retry(record, f"on node {event.node_id}: {message}")
                    return
                self.node.finish_failed(
                    record,
                    p.ErrorInfo(error_kind or "cancelled", message, record.spec.name),
                    log_event=False,
                )

    def _node_lost(self, node_id: str, cause: str) -> None:
        """Tasks this node spilled that were placed on a node now dead run again
        elsewhere while their retries last (a ``retried`` event, then a new spill);
        the others fail with WorkerCrashedError, as a task whose worker died. Its
        objects are lost -- unless only its daemon died and the next one adopts them
        at the same address: then they stay where they are, and a pull that finds one
        missing there has it rebuilt."""
        address = self.link.address_of(node_id) if self.link is not None else None
        adopted = cause == RESTARTED_CAUSE
        for object_id in self.objects.remote_at(address) if address and not adopted else []:
            self.reconstructor.object_lost(object_id, f"node {node_id}, which held it, died")
        self.elsewhere.node_lost(node_id)
        if self.actor_director.borrowed is not None:
            self.actor_director.borrowed.node_lost(node_id)
        for record in self.spills.placed_on(node_id):
            self._placed_task_lost(record, node_id)

    def _placed_on_dead_node(self, record: TaskRecord, node_id: str) -> None:
        """One spilled task (or actor) whose placement names a node already dead."""
        if record.spec.method == "__init__":
            self.elsewhere.creation_placed_on_dead_node(record, node_id)
            return
        self._placed_task_lost(record, node_id)

    def _placed_task_lost(self, record: TaskRecord, node_id: str) -> None:
        """A task this node spilled, placed on ``node_id``, which died."""
        self.spills.forget(record.spec.task_id)
        self.remote_returns.pop(record.spec.task_id, None)
        record.placed_on = None
        reason = f"node {node_id}, where it ran, died"
        if record.spec.actor_id is not None and record.spec.method != "__init__":
            self._call_lost(record, node_id)  # a call of an actor another node made
        elif record.retries_left != 0:
            self.node.retry(record, reason)  # back to the local queue: runs or spills
        else:
            self.node.finish_failed(
                record,
                p.ErrorInfo(
                    "worker_crashed", f"{reason} and no retries were left", record.spec.name
                ),
                log_event=True,
            )

    def _call_lost(self, record: TaskRecord, node_id: str) -> None:
        """A call of an actor another node made (actors_borrowed.py), on a node that
        died: sent again while ``max_task_retries`` allows (once the actor is found
        alive again: its owner makes it again elsewhere, or it is dead), else it fails
        as the actor's calls do."""
        if record.retries_left != 0:
            self.tasks.retry_attempt(record, f"the actor's node {node_id} died")
            self.actor_director.call(record)
            return
        error = p.ErrorInfo(
            "actor_died",
            f"the actor {record.spec.actor_id} was on node {node_id}, which died while the "
            "call was there (no max_task_retries left)",
            function_name=record.spec.actor_id or "",
        )
        self.node.finish_failed(record, error, log_event=True)

    # -- a task placed here --------------------------------------------------------

    def _run_placed(self, event: RecordedEvent) -> None:
        assert event.data is not None  # a placed event carries (spec, blob, owner address)
        spec, blob, owner_address = cast(
            "tuple[p.TaskSpec, bytes | None, str]", p.decode_frame(event.data)
        )
        own = self.spills.forget(spec.task_id)
        if own is not None:  # placed back on this node: run it here after all
            own.placed_back = True
            self.node.enqueue(own)
            return
        if spec.task_id in self.tasks:
            return
        record = self.tasks.add_placed(
            spec,
            int(event.payload["attempt"]),
            owner_address,
            blob,
            owner_node=event.payload.get("owner_node"),
        )
        if spec.method == "__init__":  # an actor made on another node lives here
            self.actor_director.host(record)
            here = functools.partial(self.actor_director.arguments_here, spec.actor_id or "")
            self.pull_then(record, owner_address, here)
            return
        self._keep_returns_for_owner(spec)
        self.pull_then(record, owner_address, lambda: self.node.enqueue(record))

    # -- calls of actors hosted here for another node ---------------------------------

    def _call_from_elsewhere(self, event: RecordedEvent) -> None:
        """A call of an actor hosted here, forwarded by its creator's node: it joins the
        actor's queue in the order of the log, so each caller's order holds."""
        assert event.data is not None  # a forwarded call carries its spec
        spec = cast(p.TaskSpec, p.decode_frame(event.data))
        address = (self.link.address_of(event.node_id or "") if self.link else None) or ""
        record = self.tasks.add_placed(
            spec, int(event.payload.get("attempt", 0)), address, owner_node=event.node_id
        )
        record.retries_left = 0
        self._keep_returns_for_owner(spec)
        self.pull_then(record, address, lambda: None)
        self.actor_director.call(record)

    def _keep_returns_for_owner(self, spec: p.TaskSpec) -> None:
        """A task run here for another node: its results stay here until that node has
        its copies (``Release``)."""
        for object_id in spec.return_ids():
            self.keep_for_owner(object_id)
            self.objects.expect(object_id)

    def keep_for_owner(self, object_id: str) -> None:
        """A result (or a generator's value) of a task run here for another node."""
        self.objects.hold(object_id)
        self.kept_for_owner.add(object_id)

    def _relay(self, record: TaskRecord, value: p.ObjectLocation, address: str) -> None:
        """A value a generator this node spilled yielded on the node at ``address``: the
        caller has it as it comes (streams.py); a copy here lets that node's go."""
        unknown = self._unknown_inside(value)  # (before it is ready here: that pins them)
        if not self.node.relay_stream_item(record, value):
            self._spawn(self.puller.release(address, value.object_id))
            return
        self.store.remember_job(value.object_id, record.spec.job_id)
        if value.inline is not None:
            self.recorder.log([self._transferred_event(value, address)])
        self._spawn(self._take_contained(unknown, value, address))

    def pull_then(self, record: TaskRecord, address: str, then: Any) -> None:
        """Pulls the record's argument objects from ``address`` (those not here), then
        calls ``then``; until then they are its pending dependencies."""
        # not here: never was, or freed meanwhile (a copy made here for an earlier task
        # and released by its owner), or left on another node. The refs inside its
        # arguments' values are pulled too, as Ray would when the task gets them: a
        # worker here may keep one past the task (an actor's state), and the caller's
        # node holds them only while the task is out
        wanted = list(dict.fromkeys([*record.spec.dependencies(), *record.spec.contained_refs]))
        missing = [d for d in wanted if self.objects.state(d) not in ("stored", "error")]
        for object_id in missing:
            if self.objects.state(object_id) in ("unknown", "freed", "remote"):
                self.objects.unready(object_id)  # a new entry, for the copy pulled now
        record.pending_deps = set(missing)
        for object_id in wanted:
            self.objects.hold(object_id)  # this node's copy, while the task needs it
            record.pulled.append(object_id)

        async def pull(object_id: str) -> None:
            for attempt in range(_PULL_ATTEMPTS):  # a transfer cut short is tried again
                try:
                    location = await self.puller.pull(address, object_id)
                    self.recorder.log([self._transferred_event(location, address)])
                    break
                except TransferError as exc:
                    error = p.ErrorInfo("object_lost", str(exc))
                    location = p.ObjectLocation(object_id, error=error)
                    await asyncio.sleep(0.1 * (attempt + 1))
            self.objects.ready(location)
            record.pending_deps.discard(object_id)
            if not record.pending_deps:
                then()

        for object_id in missing:
            self._spawn(pull(object_id))
        if not missing:
            then()

    def owner_released(self, request: dict[str, Any]) -> dict[str, Any]:
        object_id = str(request.get("object_id", ""))
        if object_id in self.kept_for_owner:
            self.kept_for_owner.discard(object_id)
            self.objects.release(object_id)
        return {}

    # -- the cluster's nodes (ray.nodes()) ------------------------------------------

    def answer_nodes(self, conn: Any, request_id: int) -> None:
        """Answers ClusterNodesRequest. A private cluster is this node alone: answered
        at once, with no query. A cluster's nodes are in the log (membership's
        ``cluster_nodes``), read afresh for each request so that a node that joined or
        died a moment ago is there; this node's own entry has its resources as they
        are now rather than as last logged."""
        own = self._own_summary()
        if self.link is None:
            conn.send(p.Reply(request_id, [own]))
            return

        async def answer() -> None:
            try:
                rows = await cluster_nodes(self.gcs_url)
            except Exception as exc:  # the caller gets why (RaySystemError), we go on
                conn.send(p.Reply(request_id, error=f"gcs: cannot read the nodes: {exc!r}"))
                return
            nodes = [
                own if row["node_id"] == self.node_id else _summary(row)
                for row in rows
                if row["address"] is not None  # registered (not only heartbeats)
            ]
            if not any(node.node_id == self.node_id for node in nodes):
                nodes.append(own)  # its registration is not committed yet
            conn.send(p.Reply(request_id, nodes))

        self._spawn(answer())

    def _own_summary(self) -> p.NodeSummary:
        _, _, port = self.address.rpartition(":")
        return p.NodeSummary(
            node_id=self.node_id,
            alive=True,
            ip=self.link.host if self.link is not None else "127.0.0.1",
            port=int(port) if port.isdigit() else 0,
            hostname=os.uname().nodename,
            socket=self.socket_path,
            head=self.head,
            resources=dict(self.scheduler.resources.total),
            available=dict(self.scheduler.resources.available),
            labels=dict(self.spills.labels),
        )

    # -- back home -----------------------------------------------------------------

    async def _take_back(self, record: TaskRecord) -> None:
        """A task this node spilled is over: small values come in its events; large
        ones stay on the node that made them (held there for this node) until
        something here wants them (``fetch``), as in Ray."""
        task_id = record.spec.task_id
        values = self.remote_returns.pop(task_id, {})
        locations = []
        returns = record.spec.return_ids()
        if record.spec.dynamic:  # its values follow its one return, in their order
            returns += sorted(set(values) - set(returns), key=p.return_index)
        for object_id in returns:
            self.store.remember_job(object_id, record.spec.job_id)
            location, address = values.get(object_id, (None, ""))
            if location is None:
                why = f"the log has no created event for {object_id}"
                location = p.ObjectLocation(object_id, error=p.ErrorInfo("object_lost", why))
            elif location.inline is not None:
                self.objects.charge(location.size, force=True)
                self.recorder.log([self._transferred_event(location, address)])
            locations.append(location)
        # the refs inside its values (a list of refs it made there), found before the
        # values are ready here (which pins them)
        inside = {
            location.object_id: self._unknown_inside(location) for location, _ in values.values()
        }
        for location in locations:
            if location.remote is not None:
                where = Elsewhere("remote", location.remote, location)
                self.objects.set_elsewhere(location.object_id, where)
            else:
                self.objects.ready(location)
        record.state = "FINISHED"
        if record.submitter is not None:
            record.submitter.send(p.ObjectsReady(locations))
        self.node.task_over(record)
        self.scheduler.schedule()
        await asyncio.gather(
            *(
                self._take_contained(inside[location.object_id], location, address)
                for location, address in values.values()
            )
        )

    def _unknown_inside(self, location: p.ObjectLocation) -> list[str]:
        return [object_id for object_id in location.contained if self._unknown(object_id)]

    async def _take_contained(
        self, unknown: list[str], location: p.ObjectLocation, address: str
    ) -> None:
        """After a value from the node at ``address`` is ready here: the refs inside it
        this node did not know. One left there keeps them there (fetched when wanted,
        and pulled with it when it is brought here: ``fetch``); one whose bytes came
        here is let go there, and with it what it kept: those are pulled here first."""
        if location.remote is not None:
            for object_id in unknown:
                self.objects.unready(object_id)
                where = Elsewhere("remote", address, p.ObjectLocation(object_id))
                self.objects.set_elsewhere(object_id, where)
            return
        for object_id in unknown:
            self.objects.unready(object_id)  # (waited for until pulled)
        await asyncio.gather(*(self._pull_contained(o, address) for o in unknown))
        await self.puller.release(address, location.object_id)

    def _unknown(self, object_id: str) -> bool:
        return self.objects.state(object_id) in ("unknown", "freed")

    async def _pull_contained(self, object_id: str, address: str) -> None:
        """A ref inside a value brought here, from the node that made it, before that
        node lets the value (and what it kept) go; lost if it cannot be had."""
        try:
            location = await self.puller.pull(address, object_id)
        except TransferError as exc:
            error = p.ErrorInfo("object_lost", f"object {object_id} was lost: {exc}")
            self.objects.ready(p.ObjectLocation(object_id, error=error))
            return
        self.recorder.log([self._transferred_event(location, address)])
        self.objects.ready(location)
        await self.puller.release(address, object_id)

    def fetch(self, object_id: str, address: str) -> None:
        """Something here waits for an object left on another node: pull it (once);
        if it cannot be pulled (its node died, or lost it) it is lost here, and
        rebuilt from its lineage when it can be."""
        if object_id in self.fetching:
            return
        self.fetching.add(object_id)

        async def fetch() -> None:
            try:
                location = await self.puller.pull(address, object_id)
            except TransferError as exc:
                self.fetching.discard(object_id)
                if self.objects.state(object_id) == "remote":  # not rebuilt here meanwhile
                    self.reconstructor.object_lost(object_id, str(exc))
                return
            self.fetching.discard(object_id)
            if self.objects.state(object_id) != "remote":  # freed or lost meanwhile
                self.puller.discard(location)
                return
            self.recorder.log([self._transferred_event(location, address)])
            # what it holds that is left there goes with it: pulled here first (found
            # before it is ready here, which pins them)
            there = set(self.objects.remote_at(address))
            held = [c for c in location.contained if c in there or self._unknown(c)]
            self.objects.ready(location)
            self.scheduler.schedule()
            await self._take_contained(held, location, address)

        self._spawn(fetch())

    def _transferred_event(self, location: p.ObjectLocation, source: str) -> Event:
        """Naming the object's job where the store knows it (a value of a task this node
        spilled, or one whose node named it as it was pulled); else none (the log finds
        it: eventlog/servers.py, cairn_jobs_of_v1)."""
        return Event(
            K.OBJECT,
            location.object_id,
            "transferred",
            {"size_bytes": location.size, "from_node": source},
            job_id=self.store.job_of(location.object_id),
            node_id=self.node_id,
        )


def _summary(row: dict[str, Any]) -> p.NodeSummary:
    """Another node's entry, from its ``cluster_nodes`` row. Its address is the
    "host:port" of its gRPC service (a socket path for a node of a private cluster,
    which has none: then 127.0.0.1 and port 0)."""
    host, _, port = str(row["address"]).rpartition(":")
    if not port.isdigit():
        host, port = "127.0.0.1", "0"
    alive = row["state"] == "ALIVE"
    resources = {k: float(v) for k, v in (row["resources"] or {}).items()}
    # None until its first heartbeat: all of it free
    logged = row["available"]
    available = resources if logged is None else {k: float(v) for k, v in logged.items()}
    cause = row["death_cause"] or ""
    return p.NodeSummary(
        node_id=row["node_id"],
        alive=alive,
        ip=host.strip("[]"),
        port=int(port),
        hostname=row.get("hostname") or host.strip("[]"),
        socket=row.get("socket") or "",
        head=bool(row.get("head")),
        resources=resources,
        available=dict(available),
        death_cause=cause,
        death_expected=not alive and cause == "shutdown",
        labels=node_labels(row["node_id"], row.get("labels")),
    )
