"""Named actors on a node: each job's namespace (``ray.init(namespace=...)``, else a
fresh one) and which actor holds a name in a namespace. A name is reserved before its
actor's creation is submitted, so two drivers asking for the same name get one actor
and one ``name_taken`` error; it is free again once its actor is dead (``forget``,
which the actor's owner calls: actors.py, actors_elsewhere.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataplane import protocol as p

if TYPE_CHECKING:
    from controlplane.node.task_table import Connection


class ActorNames:
    def __init__(self) -> None:
        self._holders: dict[tuple[str, str], str] = {}  # (namespace, name) -> actor id
        # the named actors created (not only reserved) and not dead: their options
        self._created: dict[str, p.ActorOptions | None] = {}
        self._job_namespaces: dict[str, str] = {}

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
        answered with the live one, if any)."""
        key = (self.namespace(request.namespace, request.job_id), request.name)
        holder = self._holders.get(key)
        if holder is not None:
            if request.get_if_exists and holder in self._created:
                conn.send(p.Reply(request.request_id, (holder, self._created[holder])))
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
            return
        self._holders[key] = request.actor_id
        conn.send(p.Reply(request.request_id, None))

    def get(self, conn: Connection, request: p.GetActor) -> None:
        key = (self.namespace(request.namespace, request.job_id), request.name)
        actor_id = self._holders.get(key, "")
        if actor_id not in self._created:
            conn.send(
                p.Reply(
                    request.request_id,
                    error=(
                        f"not_found: Failed to look up actor with name '{request.name}'. "
                        "This could because 1. You are trying to look up a named actor you "
                        "didn't create. 2. The named actor died. 3. You did not use a "
                        "namespace matching the namespace of "
                        f"the actor (looked in namespace {key[0]!r})."
                    ),
                )
            )
            return
        conn.send(p.Reply(request.request_id, (actor_id, self._created[actor_id])))

    def list(self, conn: Connection, request: p.ListNamedActors) -> None:
        """The live named actors (created, not dead), as (namespace, name)."""
        mine = self.namespace(None, request.job_id)
        named = sorted(
            key
            for key, actor_id in self._holders.items()
            if actor_id in self._created and (request.all_namespaces or key[0] == mine)
        )
        conn.send(p.Reply(request.request_id, named))

    def forget(self, actor_id: str) -> None:
        """The actor died: its names are free."""
        self._created.pop(actor_id, None)
        for key, holder in list(self._holders.items()):
            if holder == actor_id:
                del self._holders[key]
