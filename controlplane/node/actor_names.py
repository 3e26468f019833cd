"""Named actors on a node: each job's namespace (``ray.init(namespace=...)``, else a
fresh one) and which actor holds a name in a namespace. A name is reserved before its
actor's creation is submitted, so two drivers asking for the same name get one actor
and one ``name_taken`` error; it is free again once its actor is dead (``forget``,
which the actor's owner calls: actors.py, actors_elsewhere.py).

In a cluster a name is the cluster's, as in Ray: a node that does not hold it asks
the log for a live actor of that name made through another node (``named_actor`` in
controlplane/sql/queries.sql), for ``get_actor``, ``get_if_exists``, a reservation
(refused if another node's actor holds the name) and the listing. What the log cannot
settle: two nodes reserving one name at the same moment, each before the other's
creation is logged (a few milliseconds), both get it."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from controlplane.eventlog.connection import connect
from controlplane.sql import queries
from dataplane import protocol as p

if TYPE_CHECKING:
    from controlplane.node.task_table import Connection

log = logging.getLogger("cairn.node")

GONE_KEPT = 10_000  # ids of this node's named actors that died, for lookups racing their event


@dataclass(frozen=True, slots=True)
class NamedActor:
    """A live named actor the log knows of; ``options`` None until its creation task's
    ``submitted`` event is logged."""

    actor_id: str
    namespace: str
    name: str
    options: p.ActorOptions | None


async def named_in_log(gcs_url: str, namespace: str | None, name: str | None) -> list[NamedActor]:
    """The live named actors of the whole log: named ``name`` in ``namespace``, newest
    first (with their options), or every one in ``namespace`` (None: in every one)."""
    conn = await connect(gcs_url)
    try:
        if name is not None:
            rows = await conn.fetch(queries["named_actor"], namespace, name)
        else:
            rows = await conn.fetch(queries["named_actors"], namespace)
    finally:
        await conn.close()
    return [
        NamedActor(
            row["actor_id"],
            row["namespace"],
            row["name"],
            p.submitted_spec(row["creation"])[0].actor_options
            if row.get("creation") is not None
            else None,
        )
        for row in rows
    ]


class ActorNames:
    """``gcs_url`` and ``spawn`` (a cluster's node): names held through other nodes are
    looked up in the log; without (a private cluster's one node) every name is here."""

    def __init__(
        self,
        gcs_url: str | None = None,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], Any] | None = None,
    ) -> None:
        self.gcs_url = gcs_url
        self._spawn = spawn
        self._holders: dict[tuple[str, str], str] = {}  # (namespace, name) -> actor id
        # the named actors created (not only reserved) and not dead: their options
        self._created: dict[str, p.ActorOptions | None] = {}
        self._job_namespaces: dict[str, str] = {}
        self._gone: OrderedDict[str, None] = OrderedDict()  # (GONE_KEPT)

    def job_started(self, job_id: str, namespace: str) -> None:
        self._job_namespaces[job_id] = namespace

    def namespace(self, namespace: str | None, job_id: str) -> str:
        """The namespace a name given by job ``job_id`` is looked up in."""
        return namespace if namespace is not None else self._job_namespaces.get(job_id, "")

    def created(self, actor_id: str, options: p.ActorOptions | None) -> None:
        """The actor's creation was submitted (its name, if any, reserved before)."""
        if options is not None and options.name is not None:
            self._created[actor_id] = options

    def reserve(self, conn: Connection, request: p.ReserveActorName) -> None:
        """Reserves the name for ``request.actor_id``, unless it is taken: by a live
        actor, or by one reserved and not created yet (then ``get_if_exists`` is
        answered with the live one, if any). In a cluster, held here at once (a second
        request here waits for nothing) and answered once the log says that no other
        node's actor holds it."""
        key = (self.namespace(request.namespace, request.job_id), request.name)
        holder = self._holders.get(key)
        if holder is not None:
            self._taken(conn, request, key, holder, self._created.get(holder, _RESERVED))
            return
        self._holders[key] = request.actor_id
        if self._spawn is None:
            conn.send(p.Reply(request.request_id, None))
            return
        self._spawn(self._reserve_in_cluster(conn, request, key))

    async def _reserve_in_cluster(
        self, conn: Connection, request: p.ReserveActorName, key: tuple[str, str]
    ) -> None:
        try:
            found = await self._elsewhere(key)
        except Exception as exc:
            self._unreserve(key, request.actor_id)
            unread = _unread(f"reserve the name {request.name!r}", exc)
            conn.send(p.Reply(request.request_id, error=unread))
            return
        if not found:
            conn.send(p.Reply(request.request_id, None))
            return
        self._unreserve(key, request.actor_id)
        holder = found[0]
        options = holder.options if holder.options is not None else _RESERVED
        self._taken(conn, request, key, holder.actor_id, options)

    def _unreserve(self, key: tuple[str, str], actor_id: str) -> None:
        if self._holders.get(key) == actor_id:
            del self._holders[key]

    @staticmethod
    def _taken(
        conn: Connection,
        request: p.ReserveActorName,
        key: tuple[str, str],
        holder: str,
        options: object,
    ) -> None:
        """Answers a reservation of a name ``holder`` holds: the holder with
        ``get_if_exists`` once its creation is submitted (``options``: its ActorOptions,
        or _RESERVED before), else ``name_taken``."""
        if request.get_if_exists and options is not _RESERVED:
            conn.send(p.Reply(request.request_id, (holder, options)))
            return
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

    def get(self, conn: Connection, request: p.GetActor) -> None:
        key = (self.namespace(request.namespace, request.job_id), request.name)
        actor_id = self._holders.get(key, "")
        if actor_id in self._created:
            conn.send(p.Reply(request.request_id, (actor_id, self._created[actor_id])))
        elif self._spawn is None:
            conn.send(p.Reply(request.request_id, error=_not_found(request.name, key)))
        else:
            self._spawn(self._get_in_cluster(conn, request, key))

    async def _get_in_cluster(
        self, conn: Connection, request: p.GetActor, key: tuple[str, str]
    ) -> None:
        try:
            found = [a for a in await self._elsewhere(key) if a.options is not None]
        except Exception as exc:
            unread = _unread(f"look up the actor named {request.name!r}", exc)
            conn.send(p.Reply(request.request_id, error=unread))
            return
        if found:
            conn.send(p.Reply(request.request_id, (found[0].actor_id, found[0].options)))
        else:
            conn.send(p.Reply(request.request_id, error=_not_found(request.name, key)))

    async def _elsewhere(self, key: tuple[str, str]) -> list[NamedActor]:
        """The live actors named ``key`` in the log, but those of this node that died
        (their ``dead`` event may not be committed yet)."""
        assert self.gcs_url is not None
        found = await named_in_log(self.gcs_url, *key)
        return [actor for actor in found if actor.actor_id not in self._gone]

    def list(self, conn: Connection, request: p.ListNamedActors) -> None:
        """The live named actors (created, not dead), as (namespace, name): this node's,
        and in a cluster the log's."""
        mine = self.namespace(request.namespace, request.job_id)
        named = {
            key
            for key, actor_id in self._holders.items()
            if actor_id in self._created and (request.all_namespaces or key[0] == mine)
        }
        if self._spawn is None:
            conn.send(p.Reply(request.request_id, sorted(named)))
            return

        async def with_the_logs() -> None:
            assert self.gcs_url is not None
            try:
                found = await named_in_log(
                    self.gcs_url, None if request.all_namespaces else mine, None
                )
            except Exception as exc:
                conn.send(p.Reply(request.request_id, error=_unread("list the named actors", exc)))
                return
            named.update((a.namespace, a.name) for a in found if a.actor_id not in self._gone)
            conn.send(p.Reply(request.request_id, sorted(named)))

        self._spawn(with_the_logs())

    def forget(self, actor_id: str) -> None:
        """The actor died: its names are free."""
        self._created.pop(actor_id, None)
        for key, holder in list(self._holders.items()):
            if holder == actor_id:
                del self._holders[key]
        self._gone[actor_id] = None
        if len(self._gone) > GONE_KEPT:
            self._gone.popitem(last=False)


_RESERVED = object()  # (a holder whose creation is not submitted yet: no options)


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
