"""Placement groups with Ray's names (``ray.util.placement_group``): bundles of
resources reserved together, which tasks and actors then run in
(``PlacementGroupSchedulingStrategy``). Their life is in the log (``placement_group``
events: created, ready, removed)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from dataplane import protocol as p
from sdk.object_ref import ObjectRef

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class PlacementGroupID:
    binary_id: bytes

    def hex(self) -> str:
        return self.binary_id.hex()


class PlacementGroup:
    def __init__(
        self,
        pg_id: PlacementGroupID,
        bundles: list[dict[str, float]],
        ready: str,
        holder: ObjectRef | None = None,
    ) -> None:
        self.id = pg_id
        self.bundle_specs = bundles
        self._ready_object_id = ready
        # keeps the group's ready object alive as long as this handle
        self._holder = holder if holder is not None else ObjectRef(ready)

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    def ready(self) -> ObjectRef:
        """A ref that becomes ready (True) once every bundle is reserved."""
        return ObjectRef(self._ready_object_id)

    def wait(self, timeout_seconds: float | None = 30) -> bool:
        """Whether every bundle is reserved within ``timeout_seconds``."""
        from sdk import api

        ready, _ = api.wait([self.ready()], timeout=timeout_seconds)
        return bool(ready)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.id.binary_id, self.bundle_specs, self._ready_object_id))

    def __repr__(self) -> str:
        return f"PlacementGroup(id={self.id.hex()}, bundles={self.bundle_specs})"


def _rebuild(binary_id: bytes, bundles: list[dict[str, float]], ready: str) -> PlacementGroup:
    return PlacementGroup(PlacementGroupID(binary_id), bundles, ready)


def _check_bundles(bundles: Any) -> list[dict[str, float]]:
    if not isinstance(bundles, list) or not bundles:
        raise ValueError(f"bundles must be a non-empty list of dicts, got {bundles!r}")
    checked = []
    for index, bundle in enumerate(bundles):
        if not isinstance(bundle, dict) or not bundle:
            raise ValueError(f"bundle {index} must be a non-empty dict, got {bundle!r}")
        for key, amount in bundle.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"bundle {index} has an invalid resource name {key!r}")
            if not isinstance(amount, int | float) or isinstance(amount, bool) or amount < 0:
                raise ValueError(f"bundle {index} has an invalid amount for {key!r}: {amount!r}")
        if all(amount == 0 for amount in bundle.values()):
            raise ValueError(f"bundle {index} reserves nothing: {bundle!r}")
        checked.append({key: float(amount) for key, amount in bundle.items()})
    return checked


def placement_group(
    bundles: list[dict[str, float]],
    strategy: str = "PACK",
    name: str = "",
    lifetime: str | None = None,
    **_ignored: Any,
) -> PlacementGroup:
    """Asks for ``bundles`` to be reserved together; returns at once (see ``ready()``)."""
    from sdk import api

    checked = _check_bundles(bundles)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if lifetime not in (None, "detached"):
        raise ValueError(f"lifetime must be None or 'detached', got {lifetime!r}")
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {name!r}")
    client = api.client_or_auto_init()
    pg_id = PlacementGroupID(uuid.uuid4().bytes)
    ready = f"{pg_id.hex()}ffffffff"  # an object id of the group's own
    client.expect_owned([ready])
    task = api.context.current_task()
    job_id = task.job_id if task else client.welcome.job_id
    client.send(
        p.CreatePlacementGroup(
            pg_id.hex(), checked, strategy, name, job_id, ready, lifetime == "detached"
        )
    )
    return PlacementGroup(pg_id, checked, ready, ObjectRef._owned(ready))


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Releases the group's resources; its pending tasks fail, running ones finish."""
    from sdk import api

    api.client_or_auto_init().send(p.RemovePlacementGroup(placement_group.id.hex()))


def placement_group_table(placement_group: PlacementGroup | None = None) -> dict[str, Any]:
    """Ray's table: for one group its entry, else {group id: entry} of all."""
    from sdk import api

    client = api.client_or_auto_init()
    pg_id = placement_group.id.hex() if placement_group is not None else None
    table = client.request(lambda rid: p.PlacementGroupTable(rid, pg_id))
    if placement_group is not None:
        return table.get(pg_id, {})
    return table


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    """The live placement group of that name; ValueError if there is none."""
    from sdk import api

    client = api.client_or_auto_init()
    entry = client.request(lambda rid: p.PlacementGroupTable(rid, name=placement_group_name))
    if entry is None:
        raise ValueError(f"Failed to look up placement group with name: {placement_group_name}")
    return _of_entry(entry)


def get_current_placement_group() -> PlacementGroup | None:
    """The placement group the running task or actor is in; None in a driver, or in a
    task or actor not in one (as Ray)."""
    from dataplane import context
    from sdk import api

    task = context.current_task()
    pg_id = task.placement_group_id if task is not None else None
    if pg_id is None:
        return None
    table = api.client_or_auto_init().request(lambda rid: p.PlacementGroupTable(rid, pg_id))
    entry = table.get(pg_id)
    return _of_entry(entry) if entry else None


def _of_entry(entry: dict[str, Any]) -> PlacementGroup:
    return PlacementGroup(
        PlacementGroupID(bytes.fromhex(entry["placement_group_id"])),
        [entry["bundles"][i] for i in sorted(entry["bundles"])],
        entry["ready_object_id"],
    )
