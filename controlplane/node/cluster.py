"""A node daemon's part in a cluster: spilling tasks it cannot run now, running tasks
placed on it, and taking back the results of the tasks it spilled -- all through the
log, with object bytes moved over gRPC (dataplane/transfer.py).

- **Spill** (the local scheduler's hand-off): a task whose resources are not free here,
  once its arguments are ready, gets a ``spilled`` event carrying its spec (and code)
  and where its argument objects are; a global scheduler places it with a ``placed``
  event (scheduler.py).
- **Placed here**: the daemon follows the log; a task placed on this node has its
  argument objects pulled from the node that spilled it, then runs like a local task.
  Its return objects' ``created`` events carry small values inline (in the event's
  data) and this node's address otherwise, and come before its ``finished``; this node
  keeps them until the spilling node says it has its copy (``Release``).
- **Back home**: the spilling node, following the log, takes the values from the
  ``created`` events (pulling large ones), logs where its copy is (``transferred``),
  and hands them to the submitter as if the task had run here.

A mixin of NodeDaemon. Every cluster daemon reads the whole log: fine for a handful of
nodes; a filtered feed per node is the way to many.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any, cast

from controlplane.eventlog import EntityKind, Event, RecordedEvent, Tailer
from controlplane.membership import cluster_nodes
from dataplane import protocol as p
from dataplane import shm
from dataplane.object_table import Elsewhere
from dataplane.transfer import TransferError

if TYPE_CHECKING:
    from controlplane.node.task_table import TaskRecord

log = logging.getLogger("cairn.node")
K = EntityKind
_PULL_ATTEMPTS = 3  # of an argument a task placed here needs, before it fails


class ClusterMixin:
    peers: set[str]  # other nodes alive, from the log
    dead_nodes: set[str]  # nodes declared dead, from the log
    spilled: dict[str, TaskRecord]  # task id -> a task this node spilled
    # task id -> object id -> (its value when small enough to be in the log, else where
    # it is (``remote``); the address of the node holding it)
    remote_returns: dict[str, dict[str, tuple[p.ObjectLocation, str]]]
    fetching: set[str]  # objects being pulled here because something here wants them
    kept_for_owner: set[str]  # objects of placed tasks, until their owner has them

    def can_spill(self: Any, record: TaskRecord) -> bool:
        """Whether a task that does not fit here now may go to another node."""
        strategy = record.spec.strategy
        if strategy is not None and strategy[0] == "NODE_AFFINITY" and strategy[1] == self.node_id:
            return (
                strategy[2] == "soft"
                and self._spillable(record)
                and not self.resources.fits_total(record.spec.resources)
            )
        return self._spillable(record)

    def must_spill(self: Any, record: TaskRecord) -> bool:
        """Whether a task goes to the global scheduler even if it fits here: SPREAD, or
        an affinity to another node."""
        strategy = record.spec.strategy
        if strategy is None or not self._spillable(record):
            return False
        return strategy[0] == "SPREAD" or (
            strategy[0] == "NODE_AFFINITY" and strategy[1] != self.node_id
        )

    def _actor_goes_elsewhere(self: Any, creation: TaskRecord) -> bool:
        """An actor is made on another node when this one can never fit it, or a
        node affinity names another node."""
        if self.link is None or not self.link.has_peers():
            return False
        strategy = creation.spec.strategy
        if strategy is not None and strategy[0] == "NODE_AFFINITY":
            return strategy[1] != self.node_id
        return not self.resources.fits_total(creation.spec.resources)

    def _spillable(self: Any, record: TaskRecord) -> bool:
        return (
            self.rpc_port is not None
            and self.link is not None
            and self.link.has_peers()
            and record.spec.actor_id is None
            and not (record.spec.strategy and record.spec.strategy[0] == "PLACEMENT_GROUP")
            and record.placed_from is None
            and not record.placed_back
        )

    def _unschedulable_here(self: Any, record: TaskRecord) -> str | None:
        """Why a task cannot run in a cluster of this one node, if it cannot."""
        strategy = record.spec.strategy
        if strategy is None or strategy[0] != "NODE_AFFINITY" or strategy[2] == "soft":
            return None
        if strategy[1] != self.node_id and not self._spillable(record):
            return f"its hard node affinity names node {strategy[1]}, which is not in the cluster"
        return None

    def spill(self: Any, record: TaskRecord) -> None:
        spec = record.spec
        record.state = "SPILLED"
        self.spilled[spec.task_id] = record
        args = {
            object_id: {"address": self.address, "size": self.objects.location(object_id).size}
            for object_id in spec.dependencies()
        }
        blob = self.tasks.code_of(spec.function_id)
        self.recorder.log(
            [
                Event(
                    K.TASK,
                    spec.task_id,
                    "spilled",
                    {
                        "attempt": record.attempt,
                        "resources": spec.resources,
                        "args": args,
                        "from_node": self.node_id,
                        "strategy": list(spec.strategy) if spec.strategy else None,
                    },
                    job_id=spec.job_id,
                    node_id=self.node_id,
                    data=p.encode((spec, blob, self.address)),
                )
            ]
        )

    # -- following the log ---------------------------------------------------------

    async def _follow_log(self: Any, after: int) -> None:
        async with Tailer(self.gcs_url, after=after, poll_interval=0.5) as tailer:
            while True:
                for event in await tailer.read():
                    self._on_log_event(event)

    def _on_log_event(self: Any, event: RecordedEvent) -> None:
        kind, kind_type = event.entity_kind, event.event_type
        if kind is K.NODE and event.entity_id != self.node_id:
            if self.link is not None and self.link.node_event(event):  # a node died
                self._node_lost(event.entity_id)
        elif kind is K.ACTOR and event.node_id != self.node_id:
            self._on_remote_actor_event(event)
        elif kind is K.TASK and kind_type == "forwarded":
            if event.payload["to_node"] == self.node_id:
                self._call_from_elsewhere(event)
        elif kind is K.PLACEMENT_GROUP and kind_type in ("placed", "bundle_reserved", "removed"):
            self.placement_groups.on_log_event(event)
        elif kind is K.TASK and kind_type == "placed":
            if event.payload["node_id"] == self.node_id:
                self._run_placed(event)
            elif event.entity_id in self.spilled:
                record = self.spilled[event.entity_id]
                record.placed_on = event.payload["node_id"]
                if record.spec.method == "__init__":
                    self._actor_placed(record, event.payload["node_id"])
                node = record.placed_on
                if self.link is not None and self.link.is_dead_peer(node):  # known, now dead
                    # placed by a scheduler that had not read the node's death yet: the
                    # node will never run it, so it is lost with the node, as if placed
                    # just before it died
                    self._placed_on_dead_node(record, node)
        elif kind is K.OBJECT and kind_type == "created":
            task_id = event.payload.get("task_id")
            if task_id in self.spilled and event.node_id != self.node_id:
                address = event.payload["address"]
                value = (
                    p.ObjectLocation(event.entity_id, inline=event.data, size=len(event.data))
                    if event.data is not None
                    else p.ObjectLocation(
                        event.entity_id, size=int(event.payload["size_bytes"]), remote=address
                    )
                )
                self.remote_returns.setdefault(task_id, {})[event.entity_id] = (value, address)
        elif kind is K.TASK and event.entity_id in self.spilled:
            record = self.spilled[event.entity_id]
            if event.node_id == self.node_id:
                return  # this node's own events about it (e.g. spilled)
            if kind_type == "finished":
                del self.spilled[event.entity_id]
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
                del self.spilled[event.entity_id]
                self._finish_failed(
                    record,
                    p.ErrorInfo("unschedulable", event.payload.get("reason", ""), record.spec.name),
                    log_event=True,
                )
            elif kind_type in ("failed", "cancelled"):
                del self.spilled[event.entity_id]
                self.remote_returns.pop(event.entity_id, None)
                error_kind, _, message = event.payload.get("error", "").partition(": ")
                if (
                    error_kind == "object_lost"
                    and record.spec.actor_id is None
                    and record.retries_left != 0
                ):  # its node could not get an argument: this node has (or rebuilds) it
                    record.placed_on = None
                    self._retry(record, f"on node {event.node_id}: {message}")
                    return
                self._finish_failed(
                    record,
                    p.ErrorInfo(error_kind or "cancelled", message, record.spec.name),
                    log_event=False,
                )

    def _node_lost(self: Any, node_id: str) -> None:
        """Tasks this node spilled that were placed on a node now dead run again
        elsewhere while their retries last (a ``retried`` event, then a new spill);
        the others fail with WorkerCrashedError, as a task whose worker died."""
        address = self.link.address_of(node_id) if self.link is not None else None
        for object_id in self.objects.remote_at(address) if address else []:
            self.reconstructor.object_lost(object_id, f"node {node_id}, which held it, died")
        for actor in list(self.actors.values()):
            if actor.elsewhere and actor.placed_on == node_id and actor.death is None:
                self._actor_node_lost(actor, node_id)
        for record in [r for r in self.spilled.values() if r.placed_on == node_id]:
            self._placed_task_lost(record, node_id)

    def _placed_on_dead_node(self: Any, record: TaskRecord, node_id: str) -> None:
        """One spilled task (or actor) whose placement names a node already dead."""
        if record.spec.method == "__init__":
            actor = self.actors.get(record.spec.actor_id)
            if actor is not None and actor.elsewhere and actor.death is None:
                self._actor_node_lost(actor, node_id)
            return
        self._placed_task_lost(record, node_id)

    def _placed_task_lost(self: Any, record: TaskRecord, node_id: str) -> None:
        """A task this node spilled, placed on ``node_id``, which died."""
        del self.spilled[record.spec.task_id]
        self.remote_returns.pop(record.spec.task_id, None)
        record.placed_on = None
        reason = f"node {node_id}, where it ran, died"
        if record.retries_left != 0:
            self._retry(record, reason)  # back to the local queue: runs or spills
        else:
            self._finish_failed(
                record,
                p.ErrorInfo(
                    "worker_crashed", f"{reason} and no retries were left", record.spec.name
                ),
                log_event=True,
            )

    # -- a task placed here --------------------------------------------------------

    def _run_placed(self: Any, event: RecordedEvent) -> None:
        assert event.data is not None  # a placed event carries (spec, blob, owner address)
        spec, blob, owner_address = cast(
            "tuple[p.TaskSpec, bytes | None, str]", p.decode_frame(event.data)
        )
        own = self.spilled.pop(spec.task_id, None)
        if own is not None:  # placed back on this node: run it here after all
            own.placed_back = True
            self._enqueue(own)
            return
        if spec.task_id in self.tasks:
            return
        record = self.tasks.add_placed(spec, int(event.payload["attempt"]), owner_address, blob)
        if spec.method == "__init__":  # an actor made on another node lives here
            self._host_actor(record, owner_address)
            return
        self._keep_returns_for_owner(spec)
        self._pull_then(record, owner_address, lambda: self._enqueue(record))

    # -- actors hosted here for another node, and made here but living elsewhere ---

    def _actor_placed(self: Any, creation: TaskRecord, node_id: str) -> None:
        """An actor made here was placed on ``node_id``: the calls that waited for it go
        there, in order."""
        actor = self.actors.get(creation.spec.actor_id)
        if actor is None or not actor.elsewhere:
            return
        actor.placed_on = node_id
        waiting, actor.queue = list(actor.queue), type(actor.queue)()
        for record in waiting:  # (queued here before it was known to live elsewhere)
            record.state = "SPILLED"
            self.spilled[record.spec.task_id] = record
            self._forward_call(actor, record)

    def _actor_node_lost(self: Any, actor: Any, node_id: str) -> None:
        """An actor made here lived on a node that died: it is made again on another
        node if ``max_restarts`` allows (its constructor re-run; ``restarting`` says
        so), and the calls forwarded to it and not finished are sent to the new
        instance, in their order, as ``max_task_retries`` allows (each may have begun
        there: it counts as a retry); otherwise it is dead and they fail."""
        cause = f"its node {node_id} died"
        calls = [
            r
            for r in self.spilled.values()
            if r.spec.actor_id == actor.actor_id and r.spec.method != "__init__"
        ]
        for record in calls:
            del self.spilled[record.spec.task_id]
        creation = actor.creation
        self.spilled.pop(creation.spec.task_id, None)
        limit = actor.options.max_restarts
        if limit != -1 and actor.restarts >= limit:
            actor.queue.extendleft(reversed(calls))  # failed with the actor, in order
            self._actor_died(actor, cause)
            return
        actor.restarts += 1
        actor.state, actor.placed_on = "RESTARTING", None
        self.recorder.log(
            [
                Event(
                    K.ACTOR,
                    actor.actor_id,
                    "restarting",
                    {"attempt": actor.restarts, "cause": cause},
                    node_id=self.node_id,
                )
            ]
        )
        resent = []
        for record in calls:
            if record.retries_left == 0:
                self._finish_failed(
                    record,
                    p.ErrorInfo(
                        "actor_died",
                        f"the actor {actor.actor_id} died while the call was on its node "
                        f"(max_task_retries=0): {cause}",
                        function_name=actor.actor_id,
                    ),
                    log_event=True,
                )
                continue
            record.retries_left -= record.retries_left > 0
            self.next_attempt(record, f"the actor restarted: {cause}")
            resent.append(record)
        actor.queue.extendleft(reversed(resent))  # before calls made since, in order
        for record in resent:
            self.spilled[record.spec.task_id] = record  # forwarded again once placed
        # placed again (a new attempt: a new placement), its calls forwarded once it is
        self.tasks.keep(creation)  # its constructor may have finished: in hand again
        creation.placed_on = None
        self.next_attempt(creation, f"the actor restarts: {cause}")
        self.spill(creation)

    def _forward_call(self: Any, actor: Any, record: TaskRecord) -> None:
        """Hands a call to the actor's node through the log (``forwarded``, the spec in
        its data); that node reads them in log order, so each caller's order holds."""
        spec = record.spec
        self.recorder.log(
            [
                Event(
                    K.TASK,
                    spec.task_id,
                    "forwarded",
                    {
                        "actor_id": actor.actor_id,
                        "to_node": actor.placed_on,
                        "attempt": record.attempt,
                    },
                    job_id=spec.job_id,
                    node_id=self.node_id,
                    data=p.encode(spec),
                )
            ]
        )

    def _host_actor(self: Any, creation: TaskRecord, owner_address: str) -> None:
        from controlplane.node.actors import ActorRecord

        assert creation.spec.actor_id is not None  # an actor's creation task
        actor = ActorRecord(creation.spec.actor_id, creation, None)
        self.actors[actor.actor_id] = actor
        self.unscheduled_actors.add(actor.actor_id)
        # the constructor's arguments stay here while the actor lives (a restart runs
        # the constructor again), as on a creator's node
        for object_id in (*creation.spec.dependencies(), *creation.spec.contained_refs):
            self.objects.pin(object_id)
        self._pull_then(creation, owner_address, lambda: self._actor_dispatch(actor))
        actor.worker = self.worker_pool.start(actor_id=actor.actor_id)

    def _call_from_elsewhere(self: Any, event: RecordedEvent) -> None:
        """A call of an actor hosted here, forwarded by its creator's node: it joins the
        actor's queue in the order of the log, so each caller's order holds."""
        assert event.data is not None  # a forwarded call carries its spec
        spec = cast(p.TaskSpec, p.decode_frame(event.data))
        address = (self.link.address_of(event.node_id or "") if self.link else None) or ""
        record = self.tasks.add_placed(spec, int(event.payload.get("attempt", 0)), address)
        record.retries_left = 0
        self._keep_returns_for_owner(spec)
        self._pull_then(record, address, lambda: None)
        self._actor_call(record)

    def _keep_returns_for_owner(self: Any, spec: p.TaskSpec) -> None:
        """A task run here for another node: its results stay here until that node has
        its copies (``Release``)."""
        for object_id in spec.return_ids():
            self.objects.hold(object_id)
            self.kept_for_owner.add(object_id)
            self.objects.expect(object_id)

    def _pull_then(self: Any, record: TaskRecord, address: str, then: Any) -> None:
        """Pulls the record's argument objects from ``address`` (those not here), then
        calls ``then``; until then they are its pending dependencies."""
        # not here: never was, or freed meanwhile (a copy made here for an earlier task
        # and released by its owner), or left on another node
        missing = [
            d
            for d in record.spec.dependencies()
            if self.objects.state(d) not in ("stored", "error")
        ]
        for object_id in missing:
            if self.objects.state(object_id) in ("unknown", "freed", "remote"):
                self.objects.unready(object_id)  # a new entry, for the copy pulled now
        record.pending_deps = set(missing)
        for object_id in record.spec.dependencies():
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

    def _on_remote_actor_event(self: Any, event: RecordedEvent) -> None:
        actor = self.actors.get(event.entity_id)
        if actor is None:
            return
        if event.event_type == "kill_requested" and actor.owner is None:
            cause = event.payload.get("cause") or ""
            self._kill_actor(actor.actor_id, bool(event.payload["no_restart"]), cause)
        elif actor.elsewhere and event.event_type in ("alive", "restarting"):
            actor.state = "ALIVE" if event.event_type == "alive" else "RESTARTING"
        elif actor.elsewhere and event.event_type == "dead":
            actor.state = "DEAD"
            actor.death = p.ErrorInfo(
                "actor_died",
                f"the actor {actor.actor_id} died: {event.payload.get('cause', '')}",
                function_name=actor.actor_id,
            )
            self.actor_names.forget(actor.actor_id)

    def _placed_finished_events(
        self: Any, record: TaskRecord, returns: list[p.ObjectLocation]
    ) -> list[Event]:
        """The return objects' ``created`` events (values inline when small, else this
        node's address), then ``finished``: the owner sees every value first."""
        spec = record.spec
        events = [
            Event(
                K.OBJECT,
                location.object_id,
                "created",
                {
                    "size_bytes": location.size,
                    "inline": location.shm_name is None,
                    "task_id": spec.task_id,
                    "address": self.address,
                },
                job_id=spec.job_id,
                node_id=self.node_id,
                data=location.inline,
            )
            for location in returns
        ]
        events.append(self._finished_event(record))
        return events

    def _owner_released(self: Any, request: dict[str, Any]) -> dict[str, Any]:
        object_id = str(request.get("object_id", ""))
        if object_id in self.kept_for_owner:
            self.kept_for_owner.discard(object_id)
            self.objects.release(object_id)
        return {}

    # -- the cluster's nodes (ray.nodes()) ------------------------------------------

    def _cluster_nodes(self: Any, conn: Any, request_id: int) -> None:
        """Answers ClusterNodesRequest. A private cluster is this node alone: answered
        at once, with no query. A cluster's nodes are in the log (membership's
        ``cluster_nodes``), read afresh for each request so that a node that joined or
        died a moment ago is there; this node's own entry has its resources as they
        are now rather than as last logged."""
        own = self._own_summary()
        if self.rpc_port is None:
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

    def _own_summary(self: Any) -> p.NodeSummary:
        _, _, port = self.address.rpartition(":")
        return p.NodeSummary(
            node_id=self.node_id,
            alive=True,
            ip=self.rpc_host,
            port=int(port) if port.isdigit() else 0,
            hostname=os.uname().nodename,
            socket=self.socket_path,
            head=self.head,
            resources=dict(self.resources.total),
            available=dict(self.resources.available),
        )

    # -- back home -----------------------------------------------------------------

    async def _take_back(self: Any, record: TaskRecord) -> None:
        """A task this node spilled is over: small values come in its events; large
        ones stay on the node that made them (held there for this node) until
        something here wants them (``_fetch_remote``), as in Ray."""
        task_id = record.spec.task_id
        values = self.remote_returns.pop(task_id, {})
        locations = []
        for object_id in record.spec.return_ids():
            location, address = values.get(object_id, (None, ""))
            if location is None:
                why = f"the log has no created event for {object_id}"
                location = p.ObjectLocation(object_id, error=p.ErrorInfo("object_lost", why))
            elif location.inline is not None:
                self.objects.charge(location.size, force=True)
                self.recorder.log([self._transferred_event(location, address)])
            locations.append(location)
        for location in locations:
            if location.remote is not None:
                where = Elsewhere("remote", location.remote, location)
                self.objects.set_elsewhere(location.object_id, where)
            else:
                self.objects.ready(location)
        record.state = "FINISHED"
        if record.submitter is not None:
            record.submitter.send(p.ObjectsReady(locations))
        self._task_over(record)
        self.schedule()
        for location, address in values.values():
            if location.remote is None:  # this node has its copy
                await self.puller.release(address, location.object_id)

    def _fetch_remote(self: Any, object_id: str, address: str) -> None:
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
                self.objects.uncharge(location.size)
                if location.shm_name is not None:
                    shm.unlink_segment(location.shm_name)
                return
            self.recorder.log([self._transferred_event(location, address)])
            self.objects.ready(location)
            self.schedule()
            await self.puller.release(address, object_id)

        self._spawn(fetch())

    def _transferred_event(self: Any, location: p.ObjectLocation, source: str) -> Event:
        return Event(
            K.OBJECT,
            location.object_id,
            "transferred",
            {"size_bytes": location.size, "from_node": source},
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
    )
