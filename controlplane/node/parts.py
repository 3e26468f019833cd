"""The node daemon's parts, made and wired together (controlplane/README.md, "The node
daemon's parts"). Each part owns its state; the wiring below is the one place that
says which part asks which. Parts that ask each other back (the task runs and the
parts that call them) are given their counterparts once all are made (``wire``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane import pip_envs
from controlplane.node import rpc
from controlplane.node.actor_names import ActorNames, NamesInLog
from controlplane.node.actors import ActorDirector
from controlplane.node.actors_borrowed import BorrowedActors
from controlplane.node.actors_elsewhere import ActorsElsewhere
from controlplane.node.cluster_link import ClusterLink, JoinOffer
from controlplane.node.local_scheduler import LocalScheduler
from controlplane.node.metrics import NodeMetrics
from controlplane.node.object_store import ObjectStore
from controlplane.node.placement_groups import PlacementGroups
from controlplane.node.reconstruction import Reconstructor
from controlplane.node.recorder import EventRecorder
from controlplane.node.remote_tasks import RemoteTasks
from controlplane.node.resources import ResourcePool
from controlplane.node.runtime_envs import RuntimeEnvs
from controlplane.node.spilled_tasks import SpilledTasks
from controlplane.node.task_runs import TaskRuns
from controlplane.node.task_table import TaskTable
from controlplane.node.worker_output import WorkerOutput
from controlplane.node.workers import WorkerPool
from controlplane.tls import NodeTls
from dataplane.transfer import Puller


@dataclass(frozen=True)
class ClusterOptions:
    """How a cluster member listens and joins (None for a private cluster)."""

    rpc_host: str
    rpc_port: int  # 0: any free port
    auth_token: str | None
    join_offer: JoinOffer | None  # the head's: what joining nodes are told
    membership_monitor: bool


@dataclass
class NodeParts:
    node_id: str
    socket_path: str
    resources: ResourcePool
    labels: dict[str, str]  # with ray.io/node-id
    recorder: EventRecorder
    store: ObjectStore
    tasks: TaskTable
    worker_pool: WorkerPool
    placement_groups: PlacementGroups
    link: ClusterLink | None
    spills: SpilledTasks
    runs: TaskRuns
    scheduler: LocalScheduler
    names: ActorNames
    elsewhere: ActorsElsewhere
    actor_director: ActorDirector
    reconstructor: Reconstructor
    puller: Puller
    remote_tasks: RemoteTasks
    metrics: NodeMetrics = field(default_factory=NodeMetrics)  # its processes' user metrics

    def memory_summary(self) -> dict[str, Any]:
        """This node's object store, object by object (``cairn memory``)."""
        objects = self.store.objects
        return {
            "node_id": self.node_id,
            "address": self.link.address if self.link is not None else self.socket_path,
            "used": objects.used,
            "capacity": objects.capacity,
            "objects": objects.describe(),
        }

    def info(self) -> dict[str, Any]:
        """What `cairn status` and the cluster's ``Info`` call show of this node."""
        objects = self.store.objects
        return {
            "node_id": self.node_id,
            "address": self.socket_path,
            "total": dict(self.resources.total),
            "available": dict(self.resources.available),
            "object_store_used": objects.used,
            "object_store_capacity": objects.capacity,
            "objects": len(objects),
            "workers": len(self.worker_pool),
            "pending_tasks": self.scheduler.pending(),
            "waiting_tasks": self.tasks.waiting(),
            "running_tasks": self.worker_pool.running_tasks(),
            "actors": self.actor_director.alive(),
            "pending_actors": self.actor_director.waiting_for_resources(),
            "events_pending": self.recorder.backlog,  # queued, not yet committed
        }


def build_parts(
    *,
    node_id: str,
    gcs_url: str,
    session_dir: Path,
    socket_path: str,
    resources: ResourcePool,
    labels: dict[str, str],
    workers: int,
    object_store_memory: int,
    durable_dir: Path,
    head: bool,
    cluster: ClusterOptions | None,
    spawn: Callable[..., Any],
    stop_because: Callable[[str], None],
) -> NodeParts:
    """``spawn(coroutine, vital=False)`` runs background work; ``stop_because(reason)``
    stops the daemon (the cluster declared this node dead)."""
    # a cluster member appends fenced: once declared dead, its appends are refused
    recorder = EventRecorder(gcs_url, writer_node=node_id if cluster is not None else None)
    # (the lambdas name parts made further down: they are called once all are made)
    store = ObjectStore(
        node_id,
        object_store_memory,
        session_dir / "spill",
        durable_dir,
        recorder,
        spawn=spawn,
        schedule=lambda: scheduler.schedule(),
        fetch_remote=lambda object_id, address: remote_tasks.fetch(object_id, address),
        release_remote=lambda address, object_id: spawn(puller.release(address, object_id)),
        on_lost=lambda object_id, why: reconstructor.object_lost(object_id, why, needed=True),
    )
    objects = store.objects
    tasks = TaskTable(node_id, objects, recorder)
    output = WorkerOutput(
        node_id,
        gcs_url,
        session_dir / "logs",
        ip=lambda: link.host if link is not None else "127.0.0.1",
        address_of=lambda node: link.address_of(node) if link is not None else None,
        peers=lambda: link.peer_addresses() if link is not None else [],
        call=lambda address, method, request: rpc.Link().unary(address, method)(request),
    )
    worker_pool = WorkerPool(node_id, socket_path, size=workers, output=output)
    link = None
    if cluster is not None:  # the gRPC service, liveness, heartbeats, membership
        link = ClusterLink(
            node_id,
            gcs_url,
            cluster.rpc_host,
            cluster.rpc_port,
            recorder,
            auth_token=cluster.auth_token,
            tls=NodeTls.find(session_dir),
            join_offer=cluster.join_offer,
            membership_monitor=cluster.membership_monitor,
            spawn=spawn,
            on_fenced=lambda: stop_because(
                "the cluster declared this node dead (its liveness pings stopped for too long)"
            ),
        )
    placement_groups = PlacementGroups(
        node_id,
        resources,
        objects,
        recorder,
        in_cluster=lambda: link is not None and link.has_peers(),
        publish=store.make_durable_then_ready,
        created_event=store.created_event,
        schedule=lambda: scheduler.schedule(),
    )
    spills = SpilledTasks(node_id, recorder, objects, tasks, resources, labels, link)
    runs = TaskRuns(node_id, recorder, store, tasks, worker_pool, placement_groups, spills)
    envs = RuntimeEnvs(
        node_id,
        gcs_url,
        session_dir / pip_envs.RUNTIME_RESOURCES,
        recorder,
        spawn=spawn,
        on_change=lambda: envs_changed(),
    )

    def envs_changed() -> None:  # a runtime_env's setup ended: who waited for it goes on
        scheduler.schedule()
        actor_director.envs_changed()

    scheduler = LocalScheduler(resources, placement_groups, worker_pool, spills, runs, envs)
    # in a cluster a name is the cluster's: claimed in the log, looked up there
    in_log = NamesInLog(node_id, gcs_url, recorder) if cluster is not None else None
    names = ActorNames(in_log, spawn=spawn)
    elsewhere = ActorsElsewhere(node_id, recorder, objects, tasks, spills, names, runs)
    borrowed = (  # (in a cluster: actors other nodes made, called from here)
        BorrowedActors(node_id, gcs_url, recorder, spills, runs, spawn=spawn)
        if cluster is not None
        else None
    )
    actor_director = ActorDirector(
        node_id,
        gcs_url,
        session_dir,
        recorder,
        objects,
        store.memory,
        tasks,
        scheduler,
        worker_pool,
        placement_groups,
        spills,
        elsewhere,
        names,
        runs,
        envs,
        spawn=spawn,
        borrowed=borrowed,
    )
    reconstructor = Reconstructor(
        node_id, gcs_url, objects, recorder, store.spiller, runs, spawn=spawn
    )
    puller = Puller(node_id, store.memory, rpc.Link(), on_job=store.remember_job)
    remote_tasks = RemoteTasks(
        node_id,
        gcs_url,
        recorder,
        store,
        tasks,
        scheduler,
        placement_groups,
        spills,
        actor_director,
        elsewhere,
        reconstructor,
        puller,
        link,
        runs,
        socket_path=socket_path,
        head=head,
        spawn=spawn,
    )
    runs.wire(scheduler, actor_director, remote_tasks, reconstructor)
    return NodeParts(
        node_id,
        socket_path,
        resources,
        labels,
        recorder,
        store,
        tasks,
        worker_pool,
        placement_groups,
        link,
        spills,
        runs,
        scheduler,
        names,
        elsewhere,
        actor_director,
        reconstructor,
        puller,
        remote_tasks,
    )
