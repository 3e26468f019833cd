"""The node's local scheduler: the queues of tasks ready to run (their arguments are
here) and the node's resources they run on. Tasks wait in one FIFO per resource
shape (and per placement group bundle), so a shape that does not fit is skipped whole
and the cost of a pass does not grow with the number of queued tasks. A pass hands a
task to an idle worker once its resources are taken, or to the global scheduler (a
spill, ``Spills``) where the node cannot run it; what happens then is the node's
(``Dispatcher``)."""

from __future__ import annotations

import contextlib
import json
from collections import deque
from typing import Any, Literal, Protocol

from controlplane.node.placement_groups import Bundle, PlacementGroups
from controlplane.node.resources import ResourcePool
from controlplane.node.runtime_envs import Launch, RuntimeEnvs, env_key
from controlplane.node.task_table import TaskRecord
from controlplane.node.workers import WorkerHandle, WorkerPool
from dataplane import protocol as p


class Spills(Protocol):
    """What a pass of the scheduler asks of the cluster (spilled_tasks.py)."""

    def must_spill(self, record: TaskRecord) -> bool:
        """Whether the task must go to another node (its strategy or labels say so)."""

    def labels_missing(self, spec: p.TaskSpec) -> str | None:
        """Why this node cannot run the task for its labels, or None if it can."""

    def can_spill(self, record: TaskRecord) -> bool:
        """Whether another node may run the task that cannot run here now."""

    def spill(self, record: TaskRecord) -> None:
        """Hands the task to the global scheduler."""


class Dispatcher(Protocol):
    """What a pass of the scheduler asks of the node."""

    def before_pass(self) -> None:
        """Whatever waits for resources ahead of the queues (bundles, actors)."""

    def fail(self, record: TaskRecord, error: p.ErrorInfo) -> None:
        """The task can never run: it fails with ``error``."""

    def run(self, record: TaskRecord, handle: WorkerHandle) -> None:
        """Sends the task, its resources taken, to the worker ``handle``."""

    def infeasible(self, record: TaskRecord, reason: str) -> None:
        """The task needs more than this node has and cannot go elsewhere: it waits."""


class LocalScheduler:
    def __init__(
        self,
        resources: ResourcePool,
        placement_groups: PlacementGroups,
        worker_pool: WorkerPool,
        spills: Spills,
        node: Dispatcher,
        envs: RuntimeEnvs,
    ) -> None:
        self.resources = resources  # the node's, outside its placement group bundles
        self.placement_groups = placement_groups
        self.worker_pool = worker_pool
        self.spills = spills
        self.node = node
        self.envs = envs
        self._queues: dict[tuple[Any, ...], deque[TaskRecord]] = {}

    def pending(self) -> int:
        """How many tasks are queued, ready to run."""
        return sum(len(queue) for queue in self._queues.values())

    def enqueue(self, record: TaskRecord) -> None:
        record.state = "QUEUED"
        self._queues.setdefault(_queue_key(record.spec), deque()).append(record)
        self.schedule()

    def withdraw(self, record: TaskRecord) -> None:
        """Takes a queued task out (cancelled); nothing if it is not queued."""
        with contextlib.suppress(KeyError, ValueError):
            self._queues[_queue_key(record.spec)].remove(record)

    def schedule(self) -> None:
        """Dispatches queued tasks while resources and idle workers allow."""
        self.node.before_pass()
        for shape, queue in list(self._queues.items()):
            while queue:
                record = queue[0]
                if record.cancelled:
                    queue.popleft()
                    continue
                bundle = None
                if record.spec.strategy and record.spec.strategy[0] == "PLACEMENT_GROUP":
                    if self.placement_groups.bundle_elsewhere(record):  # to its bundle's node
                        queue.popleft()
                        self.spills.spill(record)
                        continue
                    bundle, never = self.placement_groups.bundle_for(record)
                    if never is not None:
                        queue.popleft()
                        self.node.fail(
                            record, p.ErrorInfo("unschedulable", never, record.spec.name)
                        )
                        continue
                    if bundle is None:
                        break
                elif self.spills.must_spill(record) or (
                    not self.resources.available_for(record.spec.resources)
                    and self.spills.can_spill(record)
                ):  # to the global scheduler
                    queue.popleft()
                    self.spills.spill(record)
                    continue
                elif getattr(record.spec, "label_selector", None) is not None and (
                    missing := self.spills.labels_missing(record.spec)
                ):  # no other node to go to: it waits, as one asking for what none has
                    if not record.reported_infeasible:
                        record.reported_infeasible = True
                        self.node.infeasible(record, missing)
                    break
                elif not self.resources.available_for(record.spec.resources):
                    if not record.reported_infeasible and not self.resources.fits_total(
                        record.spec.resources
                    ):
                        record.reported_infeasible = True
                        self.node.infeasible(
                            record,
                            f"it needs {record.spec.resources} and this node has "
                            f"{self.resources.total}",
                        )
                    break
                launch = self._launch(record)
                if isinstance(launch, str):
                    queue.popleft()
                    self.node.fail(
                        record, p.ErrorInfo("runtime_env_setup", launch, record.spec.name)
                    )
                    continue
                if launch is False:
                    break  # its runtime_env is being set up: schedule() runs again then
                key = launch.key if launch is not None else None
                if not self.worker_pool.has_idle(key):
                    self.worker_pool.grow(launch)
                    return
                queue.popleft()
                self.take(record, bundle)
                self.node.run(record, self.worker_pool.run(record, key))
            if not queue:
                del self._queues[shape]

    def _launch(self, record: TaskRecord) -> Launch | str | Literal[False] | None:
        """How the task's worker starts: None (a plain worker), its runtime_env's
        ``Launch``, False while that is set up, or why it cannot be (a str)."""
        runtime_env = getattr(record.spec, "runtime_env", None)  # (older specs: none)
        if not runtime_env or env_key(runtime_env) is None:
            return None
        launch = self.envs.launch_for(runtime_env, record.submitter)
        return False if launch is None else launch

    # -- resources -------------------------------------------------------------------

    def take(self, record: TaskRecord, bundle: Bundle | None) -> None:
        """Takes a task's resources from the node, or from its placement group bundle."""
        record.bundle = bundle
        if bundle is None:
            record.gpu_ids = self.resources.acquire(record.spec.resources)
        else:
            record.gpu_ids = self.placement_groups.take(bundle, record.spec.resources)

    def give_back(self, record: TaskRecord) -> None:
        bundle, record.bundle = record.bundle, None
        if bundle is None:
            self.resources.release(record.spec.resources, record.gpu_ids)
        else:
            self.placement_groups.give_back(bundle, record.spec.resources, record.gpu_ids)

    def block(self, handle: WorkerHandle) -> None:
        """A worker waits in get(): its CPU is lent out so nested tasks cannot deadlock."""
        self.worker_pool.set_blocked(handle, True)
        assert handle.task is not None
        pool = self._pool_of(handle.task)
        pool.release(pool.without_gpus(handle.task.spec.resources))
        self.schedule()

    def unblock(self, handle: WorkerHandle) -> None:
        self.worker_pool.set_blocked(handle, False)
        if handle.task is not None:
            pool = self._pool_of(handle.task)
            pool.acquire(pool.without_gpus(handle.task.spec.resources), allow_overcommit=True)

    def _pool_of(self, record: TaskRecord) -> ResourcePool:
        pool = record.bundle.pool if record.bundle is not None else None
        return pool if pool is not None else self.resources


def _shape(resources: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(resources.items()))


def _queue_key(spec: p.TaskSpec) -> tuple[Any, ...]:
    """The FIFO a ready task waits in: one per resource shape, and per placement group
    bundle for tasks in a group (they draw from its reserved resources), and per label
    selector (a task no node has the labels for waits without holding up others)."""
    if spec.strategy is not None and spec.strategy[0] == "PLACEMENT_GROUP":
        return (spec.strategy[:3], *_shape(spec.resources))
    selector = getattr(spec, "label_selector", None)
    if selector is not None:
        return (json.dumps(selector, sort_keys=True), *_shape(spec.resources))
    return _shape(spec.resources)
