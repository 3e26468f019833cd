"""Named actors on a node: each job's namespace (``ray.init(namespace=...)``, else a
fresh one) and which actor holds a name in a namespace. A name is reserved before its
actor's creation is submitted, so two callers asking for the same name get one actor
and one ``name_taken`` error (with ``get_if_exists``, the one actor: once its creation
is submitted); it is free again once its actor is dead (``forget``, which the actor's
owner calls: actors.py, actors_elsewhere.py).

In a cluster a name is the cluster's, as in Ray (``NamesInLog``): a reservation is
claimed in the log (a ``name_reserved`` event of the actor, made durable under a lock
of the name on the log's first server, after a look for a live holder), so two nodes
claiming one name at once get one actor; and a node that does not hold a name asks the
log for it (``get_actor``, ``get_if_exists``, the listing)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Container, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from controlplane.eventlog import EntityKind, Event
from controlplane.eventlog.connection import KeptConnection
from controlplane.node.recorder import EventRecorder
from controlplane.sql import queries
from dataplane import protocol as p

if TYPE_CHECKING:
    from controlplane.node.task_table import Connection

GONE_KEPT = 10_000  # ids of this node's named actors that died, for lookups racing their event
CREATION_WAIT_S = 10.0  # get_if_exists of a name reserved: how long its creation is waited for
CREATION_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class NamedActor:
    """A live actor holding a name in the log; ``options`` None until its creation
    task's ``submitted`` event is logged (only its claim is, yet)."""

    actor_id: str
    namespace: str
    name: str
    options: p.ActorOptions | None


class NamesInLog:
    """What a cluster's node reads and writes of actor names in the log, on one
    connection to the log's first server (made again once lost; one request at a
    time: names are rare next to calls)."""

    def __init__(self, node_id: str, gcs_url: str, recorder: EventRecorder) -> None:
        self.node_id = node_id
        self.gcs_url = gcs_url
        self.recorder = recorder
        self._gcs = KeptConnection(gcs_url)

    async def claim(
        self, key: tuple[str, str], actor_id: str, job_id: str, dead: Container[str] = ()
    ) -> NamedActor | None:
        """Claims name ``key`` for ``actor_id``, unless a live actor holds it (not one
        of ``dead``, whose deaths may not be logged yet): then that one. The claim (a
        ``name_reserved`` event, in the actor's job's shard on whichever server) is
        durable before the name's lock is let go, and a claimant looks after taking
        it, so of two at once the second sees the first."""
        async with self._gcs.use() as conn, conn.transaction():
            await conn.execute(queries["lock_actor_name"], *key)
            holders = await self._holders(conn, key)
            live = [h for h in holders if h.actor_id != actor_id and h.actor_id not in dead]
            if live:
                return live[0]
            reserved = Event(
                EntityKind.ACTOR,
                actor_id,
                "name_reserved",
                {"namespace": key[0], "name": key[1]},
                job_id=job_id,
                node_id=self.node_id,
            )
            await self.recorder.log_durable([reserved])
            return None

    async def holders(self, key: tuple[str, str]) -> list[NamedActor]:
        """The live actors holding name ``key``, newest first."""
        async with self._gcs.use() as conn:
            return await self._holders(conn, key)

    async def created(self, namespace: str | None) -> list[NamedActor]:
        """Every live named actor whose creation is logged, in ``namespace`` (None:
        in every one); without options."""
        async with self._gcs.use() as conn:
            rows = await conn.fetch(queries["named_actors"], namespace)
        return [NamedActor(r["actor_id"], r["namespace"], r["name"], None) for r in rows]

    async def _holders(self, conn: asyncpg.Connection, key: tuple[str, str]) -> list[NamedActor]:
        found: dict[str, NamedActor] = {}
        for row in await conn.fetch(queries["named_actor"], *key):
            creation = row["creation"]
            options = p.submitted_spec(creation)[0].actor_options if creation else None
            held = found.get(row["actor_id"])
            if held is None or (held.options is None and options is not None):
                found[row["actor_id"]] = NamedActor(row["actor_id"], *key, options)
        return list(found.values())


class ActorNames:
    """``in_log`` and ``spawn``: a cluster's node, whose names are claimed in and read
    from the log; without, a private cluster's one node, where every name is."""

    def __init__(
        self,
        in_log: NamesInLog | None = None,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], Any] | None = None,
    ) -> None:
        self.in_log = in_log
        self._spawn = spawn
        self._holders: dict[tuple[str, str], str] = {}  # (namespace, name) -> actor id
        # the named actors created (not only reserved) and not dead: their options
        self._created: dict[str, p.ActorOptions | None] = {}
        self._job_namespaces: dict[str, str] = {}
        self._gone: OrderedDict[str, None] = OrderedDict()  # (GONE_KEPT)
        # get_if_exists of a name whose holder's creation is not submitted yet
        self._awaiting: dict[str, list[tuple[Connection, p.ReserveActorName]]] = {}

    def job_started(self, job_id: str, namespace: str) -> None:
        self._job_namespaces[job_id] = namespace

    def namespace(self, namespace: str | None, job_id: str) -> str:
        """The namespace a name given by job ``job_id`` is looked up in."""
        return namespace if namespace is not None else self._job_namespaces.get(job_id, "")

    def created(self, actor_id: str, options: p.ActorOptions | None) -> None:
        """The actor's creation was submitted (its name, if any, reserved before):
        the ``get_if_exists`` callers that waited for it get it."""
        if options is not None and options.name is not None:
            self._created[actor_id] = options
            for conn, waiting in self._awaiting.pop(actor_id, []):
                conn.send(p.Reply(waiting.request_id, (actor_id, options)))

    def reserve(self, conn: Connection, request: p.ReserveActorName) -> None:
        """Reserves the name for ``request.actor_id``, unless it is taken: by a live
        actor, or by one reserved and not created yet (``get_if_exists`` is answered
        with the holder, once its creation is submitted). In a cluster, held here at
        once (a second request here waits for nothing) and answered once claimed in
        the log."""
        key = (self.namespace(request.namespace, request.job_id), request.name)
        holder = self._holders.get(key)
        if holder is not None and request.get_if_exists and holder not in self._created:
            self._await_creation(conn, request, holder)
        elif holder is not None:
            _taken(conn, request, key, holder, self._created.get(holder))
        else:
            self._holders[key] = request.actor_id
            if self.in_log is None or self._spawn is None:
                conn.send(p.Reply(request.request_id, None))
            else:
                self._spawn(self._claim(conn, request, key))

    def _await_creation(self, conn: Connection, request: p.ReserveActorName, holder: str) -> None:
        """Answers ``request`` with ``holder`` once its creation is submitted here, or
        says after CREATION_WAIT_S that it was not."""
        self._awaiting.setdefault(holder, []).append((conn, request))

        def too_late() -> None:
            waiting = self._awaiting.get(holder, [])
            if (conn, request) in waiting:
                waiting.remove((conn, request))
                conn.send(p.Reply(request.request_id, error=_not_made(request.name, holder)))

        asyncio.get_running_loop().call_later(CREATION_WAIT_S, too_late)

    async def _claim(
        self, conn: Connection, request: p.ReserveActorName, key: tuple[str, str]
    ) -> None:
        """Claims the name in the log; with ``get_if_exists``, a holder whose creation is
        not logged yet is asked for again until it is (or is gone: then claimed)."""
        assert self.in_log is not None
        waited = 0.0
        try:
            while True:
                holder = await self.in_log.claim(key, request.actor_id, request.job_id, self._gone)
                if holder is None or holder.options is not None or not request.get_if_exists:
                    break
                if waited >= CREATION_WAIT_S:
                    break
                await asyncio.sleep(CREATION_POLL_S)
                waited += CREATION_POLL_S
        except Exception as exc:
            self._unreserve(key, request.actor_id)
            unread = _unread(f"reserve the name {request.name!r}", exc)
            conn.send(p.Reply(request.request_id, error=unread))
            return
        if holder is None:
            conn.send(p.Reply(request.request_id, None))
            return
        self._unreserve(key, request.actor_id)
        _taken(conn, request, key, holder.actor_id, holder.options)

    def _unreserve(self, key: tuple[str, str], actor_id: str) -> None:
        """The claim of ``actor_id`` failed (another node's actor holds the name, or the
        log could not be read): the requests here that waited for it ask anew."""
        if self._holders.get(key) == actor_id:
            del self._holders[key]
        for conn, request in self._awaiting.pop(actor_id, []):
            self.reserve(conn, request)

    def get(self, conn: Connection, request: p.GetActor) -> None:
        key = (self.namespace(request.namespace, request.job_id), request.name)
        actor_id = self._holders.get(key, "")
        if actor_id in self._created:
            conn.send(p.Reply(request.request_id, (actor_id, self._created[actor_id])))
        elif self.in_log is None or self._spawn is None:
            conn.send(p.Reply(request.request_id, error=_not_found(request.name, key)))
        else:
            self._spawn(self._get_in_log(conn, request, key))

    async def _get_in_log(
        self, conn: Connection, request: p.GetActor, key: tuple[str, str]
    ) -> None:
        assert self.in_log is not None
        try:
            found = [
                holder
                for holder in await self.in_log.holders(key)
                if holder.options is not None and holder.actor_id not in self._gone
            ]
        except Exception as exc:
            unread = _unread(f"look up the actor named {request.name!r}", exc)
            conn.send(p.Reply(request.request_id, error=unread))
            return
        if found:
            conn.send(p.Reply(request.request_id, (found[0].actor_id, found[0].options)))
        else:
            conn.send(p.Reply(request.request_id, error=_not_found(request.name, key)))

    def list(self, conn: Connection, request: p.ListNamedActors) -> None:
        """The live named actors (created, not dead), as (namespace, name): this node's,
        and in a cluster the log's."""
        mine = self.namespace(request.namespace, request.job_id)
        named = {
            key
            for key, actor_id in self._holders.items()
            if actor_id in self._created and (request.all_namespaces or key[0] == mine)
        }
        if self.in_log is None or self._spawn is None:
            conn.send(p.Reply(request.request_id, sorted(named)))
            return
        in_log = self.in_log

        async def with_the_logs() -> None:
            try:
                found = await in_log.created(None if request.all_namespaces else mine)
            except Exception as exc:
                conn.send(p.Reply(request.request_id, error=_unread("list the named actors", exc)))
                return
            named.update((a.namespace, a.name) for a in found if a.actor_id not in self._gone)
            conn.send(p.Reply(request.request_id, sorted(named)))

        self._spawn(with_the_logs())

    def forget(self, actor_id: str) -> None:
        """The actor died: its names are free (a ``get_if_exists`` that waited for its
        creation reserves the name anew)."""
        self._created.pop(actor_id, None)
        for key, holder in list(self._holders.items()):
            if holder == actor_id:
                del self._holders[key]
        self._gone[actor_id] = None
        if len(self._gone) > GONE_KEPT:
            self._gone.popitem(last=False)
        for conn, request in self._awaiting.pop(actor_id, []):
            self.reserve(conn, request)


def _taken(
    conn: Connection,
    request: p.ReserveActorName,
    key: tuple[str, str],
    holder: str,
    options: p.ActorOptions | None,
) -> None:
    """Answers a reservation of a name ``holder`` holds: the holder with
    ``get_if_exists`` (``options``: its creation's, None if not submitted yet: then
    it cannot be given), else ``name_taken``."""
    if request.get_if_exists and options is not None:
        conn.send(p.Reply(request.request_id, (holder, options)))
    elif request.get_if_exists:
        conn.send(p.Reply(request.request_id, error=_not_made(request.name, holder)))
    else:
        conn.send(
            p.Reply(
                request.request_id,
                error=(
                    f"name_taken: The name {request.name} (namespace={key[0]}) is already "
                    "taken. Please use a different name or get the existing actor using "
                    f"ray.get_actor('{request.name}', namespace='{key[0]}')"
                ),
            )
        )


def _not_made(name: str, holder: str) -> str:
    return (
        f"name_taken: the name {name!r} is reserved by actor {holder}, whose creation was "
        f"not submitted within {CREATION_WAIT_S:g}s (its caller may have failed or exited "
        "in between); try again"
    )


def _not_found(name: str, key: tuple[str, str]) -> str:
    return (
        f"not_found: Failed to look up actor with name '{name}'. This could because 1. You "
        "are trying to look up a named actor you didn't create. 2. The named actor died. "
        "3. You did not use a namespace matching the namespace of the actor (looked in "
        f"namespace {key[0]!r})."
    )


def _unread(doing: str, exc: BaseException) -> str:
    return (
        f"could not {doing} in the cluster: the log, which holds the names of other "
        f"nodes' actors, could not be read: {exc}"
    )
