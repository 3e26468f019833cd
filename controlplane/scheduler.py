"""The global scheduler: places the tasks that nodes spill (the upper level of the
bottom-up scheduler). Run as ``python -m controlplane.scheduler`` with ``$CAIRN_GCS_URL``
set; the head starts one, and any number may run.

It keeps no state of its own: it folds the log (nodes, their resources and load,
spilled tasks not yet placed), so one killed and restarted resumes where the log is.
To restart in a time that does not grow with the history, it saves its folded state
every ``CHECKPOINT_EVERY`` events (the ``checkpoints`` table) and, restarted, reads on
from the last checkpoint; without one it folds the log from the start.

A placement is a ``placed`` event whose id is derived from the task and its spill
attempt, so when several schedulers place the same spill only the first append is
stored (the log's idempotence by event id is the fencing): a task is never assigned
twice. A spill that no node could ever satisfy gets one ``infeasible`` event (and a
warning) and waits for a node that can.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pickle
import signal
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane import labels
from controlplane.errors import GcsIdentityError
from controlplane.eventlog import (
    EVERY_NODE,
    SCHEDULER,
    EntityKind,
    Event,
    EventAppender,
    LogAppender,
    RecordedEvent,
    fencing,
    log_head_positions,
    open_appender,
    open_tailer,
)
from controlplane.eventlog.connection import connect, is_disk_full
from controlplane.eventlog.events import uuid7_at
from controlplane.eventlog.servers import LogTailer, ServersAppender, ServersTailer
from controlplane.gcs_url import ENV_VAR as GCS_URL_ENV
from controlplane.parent_death import die_with_parent
from controlplane.settings import env_number
from controlplane.sql import queries

log = logging.getLogger("cairn.scheduler")
_STOP_TIMEOUT_S = 3.0
_PLACEMENT_IDS = uuid.UUID("6f0b3d62-3c1e-4b8e-9a55-0c4e1f1d2a70")


CHECKPOINT_NAME = "global_scheduler"  # one for all: they fold the same events
CHECKPOINT_EVERY = int(
    env_number("CAIRN_SCHEDULER_CHECKPOINT_EVERY", 10_000, minimum=1, unit="events")
)


def decision_event_id(name: str, cause: RecordedEvent) -> uuid.UUID:
    """The id of what every scheduler decides alike of the event ``cause`` (``name``
    says which decision): the log stores the first one appended. Shaped as a UUIDv7 of
    the time the log recorded ``cause`` (its own clock, read by every scheduler alike):
    each copy is appended after it, so the append's duplicate check may skip the
    partitions sealed before it (migration 0030); a uuid5 was checked in every one."""
    made_ms = int(cause.recorded_at.timestamp() * 1000)
    return uuid7_at(made_ms, uuid.uuid5(_PLACEMENT_IDS, name).int)


@dataclass
class NodeView:
    node_id: str
    address: str
    total: dict[str, float]
    available: dict[str, float]
    placed_since_heartbeat: dict[str, float] = field(default_factory=dict)
    spread: int = 0  # SPREAD tasks placed here (by this scheduler)

    queued_cpus: float = 0.0  # CPUs wanted by tasks queued there, at the last heartbeat
    labels: dict[str, str] | None = None  # its labels (None in checkpoints from before)

    def free(self, name: str) -> float:
        """What is free there as far as this scheduler knows: negative when more is
        queued there than it has."""
        queued = self.queued_cpus if name == "CPU" else 0.0
        return self.available.get(name, 0.0) - self.placed_since_heartbeat.get(name, 0.0) - queued

    def feasible(self, request: dict[str, float]) -> bool:
        return all(self.total.get(k, 0.0) >= v for k, v in request.items() if v > 0)

    def fits_now(self, request: dict[str, float]) -> bool:
        return all(self.free(k) >= v for k, v in request.items() if v > 0)

    def has_labels(self, selector: dict[str, Any] | None) -> bool:
        return labels.hard_match(self.labels or {}, selector)


@dataclass
class Spill:
    event: RecordedEvent
    resources: dict[str, float]
    attempt: int
    from_node: str | None
    strategy: tuple[str, ...] | None = None
    reported_infeasible: bool = False
    label_selector: dict[str, Any] | None = None  # (controlplane/labels.py)
    # node address -> bytes of the task's arguments held there
    arg_bytes: dict[str, int] = field(default_factory=dict)


def _bytes_by_address(args: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many argument bytes each node holds, from a spill's ``args``."""
    held: dict[str, int] = {}
    for where in args.values():
        held[where["address"]] = held.get(where["address"], 0) + int(where.get("size") or 0)
    return held


class GlobalScheduler:
    def __init__(self, url: str, *, checkpoint_every: int = CHECKPOINT_EVERY) -> None:
        self.url = url
        self.checkpoint_every = checkpoint_every
        self.nodes: dict[str, NodeView] = {}
        self.pending: dict[str, Spill] = {}  # task id -> its latest unplaced spill
        # task id -> its latest placed attempt, while the task is not over (bounded by
        # the tasks in flight)
        self.placed: dict[str, int] = {}
        self.groups: dict[str, RecordedEvent] = {}  # placement groups to place
        self.group_nodes: dict[str, list[str]] = {}  # placed groups: node of each bundle
        self.infeasible_groups: set[str] = set()
        self.appender: LogAppender = EventAppender(url)  # (the log's own, from run())
        self.tailer: LogTailer | None = None  # (from run())
        # appends not answered within the appender's away_after (a log on several
        # servers, one of which went away meanwhile): they land once it is back
        self.appending: set[asyncio.Future[list[int]]] = set()
        self.following = asyncio.Event()  # set once it has read the log and placed

    async def run(self) -> None:
        self.appender = await open_appender(self.url)
        await self.appender.start()
        try:
            start, heads = await self.load_checkpoint()
            saved = max(start, default=0)
            async with await open_tailer(self.url, reader=SCHEDULER, after=start) as tailer:
                self.tailer = tailer
                while True:
                    for event in await tailer.read():
                        self.apply(event)
                    await self.place_pending()
                    self._check_appends()
                    # (a checkpoint holds what was placed: only once it is in the log)
                    if tailer.position - saved >= self.checkpoint_every and not self.appending:
                        try:
                            await self.save_checkpoint(tailer.positions)
                        except Exception as exc:  # a cache: without it, a longer fold
                            if not is_disk_full(exc):
                                raise
                            log.warning("the scheduler checkpoint was not saved: %s", exc)
                        saved = tailer.position  # (else: the next one, as many events on)
                    if not self.following.is_set() and tailer.reached(heads):
                        self.following.set()  # caught up with the log as it was at start
        finally:
            await self.appender.close()

    # -- checkpoints: the folded state, so a restart reads only what came after -----

    _STATE = ("nodes", "pending", "placed", "groups", "group_nodes", "infeasible_groups")

    async def load_checkpoint(self) -> tuple[list[int], list[int]]:
        """Loads the latest checkpoint, if any; returns its positions (where to read on
        from in each shard) and the log's heads now."""
        conn = await connect(self.url)
        try:
            row = await conn.fetchrow(queries["load_checkpoint"], CHECKPOINT_NAME)
        finally:
            await conn.close()
        heads = await log_head_positions(self.url, away_ok=True)
        if row is None:
            return [0], heads
        try:
            state = pickle.loads(row["state"])
            values = [state[name] for name in self._STATE]
        except Exception as exc:  # an older shape: fold the log from the start instead
            log.warning("ignoring the scheduler checkpoint (%r): folding the whole log", exc)
            return [0], heads
        for name, value in zip(self._STATE, values, strict=True):
            setattr(self, name, value)
        return list(row["positions"]) or [0], heads

    async def save_checkpoint(self, positions: list[int]) -> None:
        state = pickle.dumps({name: getattr(self, name) for name in self._STATE})
        conn = await connect(self.url)
        try:
            await conn.execute(queries["save_checkpoint"], CHECKPOINT_NAME, positions, state)
        finally:
            await conn.close()

    def apply(self, event: RecordedEvent) -> None:
        """Folds one event into the view."""
        kind, payload = event.entity_kind, event.payload
        if kind is EntityKind.NODE:
            if event.event_type == "registered":
                total = {k: float(v) for k, v in payload["resources"].items()}
                self.nodes[event.entity_id] = NodeView(
                    event.entity_id,
                    payload["address"],
                    total,
                    dict(total),
                    labels=labels.node_labels(event.entity_id, payload.get("labels")),
                )
                self.infeasible_groups.clear()  # a new node may make them placeable
            elif event.event_type == "heartbeat" and event.entity_id in self.nodes:
                node = self.nodes[event.entity_id]
                node.available = {k: float(v) for k, v in payload.get("available", {}).items()}
                node.queued_cpus = float(payload.get("load", {}).get("pending_tasks", 0))
                node.placed_since_heartbeat.clear()
            elif event.event_type == "dead":
                self.nodes.pop(event.entity_id, None)
        elif kind is EntityKind.PLACEMENT_GROUP:
            if event.event_type == "created" and payload.get("cluster"):
                self.groups[event.entity_id] = event
            elif event.event_type == "placed":
                self.groups.pop(event.entity_id, None)
                self.group_nodes[event.entity_id] = list(payload["bundle_nodes"])
            elif event.event_type == "removed":
                self.groups.pop(event.entity_id, None)
                self.group_nodes.pop(event.entity_id, None)
        elif kind is EntityKind.TASK:
            if event.event_type == "spilled":
                self.pending[event.entity_id] = Spill(
                    event,
                    {k: float(v) for k, v in payload["resources"].items()},
                    int(payload["attempt"]),
                    payload.get("from_node"),
                    tuple(payload["strategy"]) if payload.get("strategy") else None,
                    arg_bytes=_bytes_by_address(payload.get("args", {})),
                    label_selector=payload.get("label_selector"),
                )
            elif event.event_type in ("cancelled", "finished", "failed"):
                self.pending.pop(event.entity_id, None)
                self.placed.pop(event.entity_id, None)
            elif event.event_type == "placed":
                attempt = int(payload["attempt"])
                self.placed[event.entity_id] = max(attempt, self.placed.get(event.entity_id, -1))
                spill = self.pending.get(event.entity_id)
                if spill is not None and spill.attempt == int(payload["attempt"]):
                    del self.pending[event.entity_id]

    def choose(self, spill: Spill) -> NodeView | None:
        """The node for a spill. Default: among nodes that could ever run it, the one
        with the most free CPU as this scheduler sees it (free at the last heartbeat,
        less what was queued there and what it placed there since), another node
        than the spilling one on ties; but a node where it fits now and that holds more
        of its argument bytes comes first (data locality: bytes not moved). SPREAD:
        the feasible node given fewest SPREAD tasks so far. Node affinity: that node,
        if alive and feasible (else, if soft, the default). A label selector: only
        nodes with the labels it needs are feasible, and among them those with the
        labels it prefers come first."""
        selector = spill.label_selector
        feasible = [
            n
            for n in self.nodes.values()
            if n.feasible(spill.resources) and (selector is None or n.has_labels(selector))
        ]
        strategy = spill.strategy or ("DEFAULT",)
        if strategy[0] == "PLACEMENT_GROUP":  # the node of its bundle (any, for -1)
            nodes = self.group_nodes.get(strategy[1], [])
            index = int(strategy[2])
            candidates = nodes if index < 0 else nodes[index : index + 1]
            alive = [self.nodes[n] for n in candidates if n in self.nodes]
            return max(alive, key=lambda n: n.free("CPU")) if alive else None
        if strategy[0] == "NODE_AFFINITY":
            target = self.nodes.get(strategy[1])
            if target is not None and target in feasible:
                return target
            if strategy[2] == "hard":
                return None
        if not feasible:
            return None
        if selector is not None and selector.get("soft"):
            preferred = [n for n in feasible if labels.soft_match(n.labels or {}, selector)]
            feasible = preferred or feasible
        if strategy[0] == "SPREAD":
            return min(feasible, key=lambda n: (n.spread, -n.free("CPU")))
        return max(
            feasible,
            key=lambda n: (
                spill.arg_bytes.get(n.address, 0) if n.fits_now(spill.resources) else 0,
                n.free("CPU"),
                n.node_id != spill.from_node,
            ),
        )

    def _unplaceable(self, spill: Spill) -> tuple[str, bool]:
        """Why a spill has no node, and whether that is final (a hard affinity to a
        node that is gone or too small fails the task; resources may yet come)."""
        strategy = spill.strategy
        if strategy is not None and strategy[0] == "NODE_AFFINITY" and strategy[2] == "hard":
            if strategy[1] not in self.nodes:
                return f"its hard node affinity names node {strategy[1]}, which is not alive", True
            return f"its hard node affinity names node {strategy[1]}, which is too small", True
        selector = spill.label_selector
        if selector is not None and not any(n.has_labels(selector) for n in self.nodes.values()):
            return (
                f"no node of the cluster has the labels its label_selector needs "
                f"({labels.describe(selector)})",
                False,
            )
        return f"no node of the cluster has {spill.resources}", False

    def place_group(self, bundles: list[dict[str, float]], strategy: str) -> list[str] | None:
        """A node for each bundle, by the group's strategy; None if none fits."""
        free = {n.node_id: {k: n.free(k) for k in n.total} for n in self.nodes.values()}
        totals = {n.node_id: n.total for n in self.nodes.values()}

        def fits(node_id: str, bundle: dict[str, float]) -> bool:
            return all(totals[node_id].get(k, 0.0) >= v for k, v in bundle.items() if v > 0)

        def take(node_id: str, bundle: dict[str, float]) -> None:
            for k, v in bundle.items():
                free[node_id][k] = free[node_id].get(k, 0.0) - v

        if strategy == "STRICT_PACK":
            total: dict[str, float] = {}
            for bundle in bundles:
                for k, v in bundle.items():
                    total[k] = total.get(k, 0.0) + v
            able = [n for n in totals if fits(n, total)]
            if not able:
                return None
            best = max(able, key=lambda n: free[n].get("CPU", 0.0))
            return [best] * len(bundles)
        chosen: list[str] = []
        for bundle in bundles:
            able = [n for n in totals if fits(n, bundle)]
            if strategy in ("STRICT_SPREAD", "SPREAD"):
                unused = [n for n in able if n not in chosen]
                if strategy == "STRICT_SPREAD" or unused:
                    able = unused
            elif (
                strategy == "PACK"
                and chosen
                and chosen[-1] in able
                and all(free[chosen[-1]].get(k, 0.0) >= v for k, v in bundle.items())
            ):
                able = [chosen[-1]]  # keep packing onto the same node while it fits
            if not able:
                return None
            node = max(able, key=lambda n: free[n].get("CPU", 0.0))
            take(node, bundle)
            chosen.append(node)
        return chosen

    async def place_groups(self) -> list[Event]:
        events = []
        for pg_id, created in list(self.groups.items()):
            bundles = [{k: float(v) for k, v in b.items()} for b in created.payload["bundles"]]
            strategy = created.payload["strategy"]
            nodes = self.place_group(bundles, strategy)
            if nodes is None:
                if pg_id not in self.infeasible_groups:
                    self.infeasible_groups.add(pg_id)
                    reason = f"no {strategy} placement of {bundles} on the {len(self.nodes)} nodes"
                    log.warning("placement group %s: %s", pg_id, reason)
                    events.append(
                        Event(
                            EntityKind.PLACEMENT_GROUP,
                            pg_id,
                            "infeasible",
                            {"reason": reason, "to_node": EVERY_NODE},
                            job_id=created.job_id,
                            event_id=decision_event_id(f"{pg_id}:x", created),
                        )
                    )
                continue
            del self.groups[pg_id]
            self.group_nodes[pg_id] = nodes
            events.append(
                Event(
                    EntityKind.PLACEMENT_GROUP,
                    pg_id,
                    "placed",
                    {
                        "bundle_nodes": nodes,
                        "bundles": bundles,
                        "strategy": strategy,
                        "to_node": EVERY_NODE,
                    },
                    job_id=created.job_id,
                    event_id=decision_event_id(f"{pg_id}:placed", created),
                )
            )
        return events

    async def place_pending(self) -> None:
        events = await self.place_groups()
        for task_id, spill in list(self.pending.items()):
            if self.placed.get(task_id, -1) >= spill.attempt:
                del self.pending[task_id]
                continue
            if self._held_away(spill.event.job_id):
                continue  # (placed once its server is back: its node could not run it)
            node = self.choose(spill)
            if node is None:
                if not spill.reported_infeasible:
                    spill.reported_infeasible = True
                    reason, final = self._unplaceable(spill)
                    log.warning("task %s is infeasible: %s", task_id, reason)
                    if final:
                        del self.pending[task_id]
                    events.append(
                        Event(
                            EntityKind.TASK,
                            task_id,
                            "infeasible",
                            {
                                "resources": spill.resources,
                                "reason": reason,
                                "final": final,
                                "attempt": spill.attempt,
                                **_owner(spill),
                            },
                            job_id=spill.event.job_id,
                            event_id=decision_event_id(f"{task_id}:{spill.attempt}:x", spill.event),
                        )
                    )
                continue
            for name, amount in spill.resources.items():
                node.placed_since_heartbeat[name] = (
                    node.placed_since_heartbeat.get(name, 0.0) + amount
                )
            if spill.strategy and spill.strategy[0] == "SPREAD":
                node.spread += 1
            events.append(
                Event(
                    EntityKind.TASK,
                    task_id,
                    "placed",
                    {"node_id": node.node_id, "attempt": spill.attempt, "to_node": node.node_id}
                    | _owner(spill),
                    job_id=spill.event.job_id,
                    node_id=node.node_id,
                    data=spill.event.data,
                    event_id=decision_event_id(f"{task_id}:{spill.attempt}", spill.event),
                )
            )
            self.placed[task_id] = spill.attempt
            del self.pending[task_id]
        if events:
            await self._append(events)

    async def _append(self, events: list[Event]) -> None:
        """Appends ``events``; on a log on several servers, waits at most the time after
        which a server that does not answer is away: its part lands once it is back,
        and the other servers' jobs are placed meanwhile."""
        if not isinstance(self.appender, ServersAppender):
            await self.appender.append_many(events)
            return
        appended = asyncio.ensure_future(self.appender.append_many(events))
        self.appending.add(appended)
        await asyncio.wait([appended], timeout=self.appender.away_after)
        self._check_appends()

    def _check_appends(self) -> None:
        """Forgets the appends that landed; one that failed fails the scheduler, as an
        append it waited for does."""
        for appended in [a for a in self.appending if a.done()]:
            self.appending.discard(appended)
            appended.result()

    def _held_away(self, job_id: str | None) -> bool:
        """Whether ``job_id``'s server of the log is away for this scheduler's reader."""
        tailer, appender = self.tailer, self.appender
        if not isinstance(tailer, ServersTailer) or not tailer.away:
            return False
        assert isinstance(appender, ServersAppender)
        return appender.server_of_job(job_id) in tailer.away


def _owner(spill: Spill) -> dict[str, str]:
    """What a placement or infeasibility of ``spill`` says of whom to tell: the node
    that spilled it (``owner_node``), which follows it from the log."""
    return {"owner_node": spill.from_node} if spill.from_node else {}


def _say_following(waiting: asyncio.Future[Any]) -> None:
    """Tells whoever started it (a test, an operator) that it takes part now."""
    if not waiting.cancelled():
        print("following the log", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m controlplane.scheduler")
    # the URL holds a password: given in $CAIRN_GCS_URL, not argv (readable by all)
    parser.add_argument("--gcs-url", default=os.environ.get(GCS_URL_ENV))
    parser.add_argument("--die-with-parent", action="store_true")
    args = parser.parse_args()
    if not args.gcs_url:
        parser.error(f"the GCS URL is needed (${GCS_URL_ENV} or --gcs-url)")
    if args.die_with_parent:
        die_with_parent()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    # this process serves one log: the first it reaches, or the one its head's daemon
    # saw ($CAIRN_GCS_IDENTITY_FILE); a GCS wiped, replaced or put back is refused
    known = os.environ.get(fencing.IDENTITY_FILE_ENV)
    fencing.remember(Path(known) if known else None, save=False)

    async def run() -> None:
        scheduler = GlobalScheduler(args.gcs_url)
        scheduling = asyncio.ensure_future(scheduler.run())
        following = asyncio.ensure_future(scheduler.following.wait())
        following.add_done_callback(_say_following)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([scheduling, stopping], return_when=asyncio.FIRST_COMPLETED)
        if scheduling.done():
            scheduling.result()  # it failed: say why
            return
        scheduling.cancel()
        _, unfinished = await asyncio.wait([scheduling], timeout=_STOP_TIMEOUT_S)
        if unfinished:  # no state to save: what it appended is committed or not at all
            log.warning("stopping without closing connections (they did not close in time)")
            os._exit(0)

    try:
        asyncio.run(run())
    except GcsIdentityError as error:  # not the log it was following: it must not place
        log.error("global scheduler: %s", error)
        sys.exit(fencing.GCS_REFUSED_EXIT)


if __name__ == "__main__":
    main()
