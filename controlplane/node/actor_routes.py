"""Direct actor calls' bookkeeping on the daemon's side (controlplane/README.md, "Direct
actor calls"): the callers waiting for an actor's route (``WatchActor``, answered once
the actor is alive, moved to another node or dead), and the workers' answers to
direct calls that came before the caller's copy of the call.

``ActorRoutes`` owns both; it reads the actors' records, which the actor director
owns (actors.py), and changes nothing in them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dataplane import protocol as p

if TYPE_CHECKING:
    from controlplane.node.actors import ActorRecord
    from controlplane.node.task_table import Connection


def may_call_directly(actor: ActorRecord) -> bool:
    """Actors that replay their calls on restart never take direct calls: their replay
    reads finished calls from the log, so those must be durable before callers see them."""
    return actor.death is None and not actor.options.replay_calls_on_restart


class ActorRoutes:
    def __init__(self, session_dir: Path) -> None:
        self.session_dir = session_dir
        self._watchers: dict[str, list[Connection]] = {}  # actor id -> waiting callers
        self._early: dict[str, p.TaskDone] = {}  # task id -> the worker's answer

    def watch(self, conn: Connection, actor: ActorRecord | None, actor_id: str) -> None:
        """``conn`` asks for the actor's route: answered now, or once it is alive."""
        if actor is not None and may_call_directly(actor) and actor.state != "ALIVE":
            self._watchers.setdefault(actor_id, []).append(conn)
        else:
            conn.send(self.route_of(actor, actor_id))

    def tell(self, actor: ActorRecord | None, actor_id: str) -> None:
        """Callers waiting for the actor's route get it, now that it is alive, moved to
        another node (``actor`` None here) or dead."""
        watchers = self._watchers.pop(actor_id, [])
        route = self.route_of(actor, actor_id)
        for conn in watchers:
            conn.send(route)

    def route_of(self, actor: ActorRecord | None, actor_id: str) -> p.ActorRoute:
        handle = actor.worker if actor is not None else None
        if (
            actor is None
            or handle is None
            or handle.conn is None
            or actor.state != "ALIVE"
            or not may_call_directly(actor)
        ):
            return p.ActorRoute(actor_id, None, None)
        path = p.direct_socket_path(str(self.session_dir), handle.worker_id)
        return p.ActorRoute(actor_id, handle.worker_id, path)

    def answered_early(self, done: p.TaskDone) -> None:
        """A direct call's answer whose caller's copy of the call is still on its way."""
        self._early[done.task_id] = done

    def take_early(self, task_id: str) -> p.TaskDone | None:
        return self._early.pop(task_id, None)
