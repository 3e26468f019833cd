"""Pure logic, no server: URLs, the catalog, position assignment, the fold."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from controlplane.eventlog import EntityKind, Event, RecordedEvent, new_event_id
from controlplane.eventlog.catalog import CATALOG, encode_payload
from controlplane.gcs_url import normalize, redact, resolve_gcs_url, sqlalchemy_url
from controlplane.projections import TABLES, TRANSITIONS, fold


def test_redact_hides_only_the_password() -> None:
    assert redact("postgresql://u:pw@h:5/db?x=1") == "postgresql://u:***@h:5/db?x=1"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


def test_url_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    assert normalize("postgres://u@h/db") == "postgresql://u@h/db"
    assert sqlalchemy_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(ValueError, match=r"not a PostgreSQL URL: 'mysql://u:\*\*\*@h/db'"):
        normalize("mysql://u:pw@h/db")
    monkeypatch.setenv("CAIRN_GCS_URL", "postgres://env@h/db")
    assert resolve_gcs_url() == "postgresql://env@h/db"
    assert resolve_gcs_url("postgresql://arg@h/db") == "postgresql://arg@h/db"
    monkeypatch.delenv("CAIRN_GCS_URL")
    assert resolve_gcs_url() is None


def test_event_ids_are_unique_and_time_ordered() -> None:
    ids = [new_event_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(i.version == 7 for i in ids)
    assert [i.int >> 80 for i in ids] == sorted(i.int >> 80 for i in ids)


def test_every_catalog_entry_with_required_fields_accepts_a_full_payload() -> None:
    samples = {str: "x", int: 1, dict: {}, list: [], bool: True}
    for (kind, name), spec in CATALOG.items():
        payload = {field: samples[t] for field, t in spec.required.items()}  # type: ignore[index]
        assert encode_payload(Event(kind, "id", name, payload)).startswith("{")


def test_every_transition_names_a_catalog_event_and_known_columns() -> None:
    for (kind, name), transition in TRANSITIONS.items():
        assert (kind, name) in CATALOG
        spec = CATALOG[(kind, name)]
        for source, column in transition.copy.items():
            assert source in {**spec.required, **spec.optional}
            assert column in TABLES[kind].columns
        for column in transition.stamp:
            assert column in TABLES[kind].columns


def _recorded(
    position: int, kind: EntityKind, entity: str, event_type: str, **payload: object
) -> RecordedEvent:
    return RecordedEvent(
        position,
        uuid.uuid4(),
        datetime(2026, 1, 1, 0, 0, position, tzinfo=UTC),
        "job",
        kind,
        entity,
        event_type,
        "node-1",
        dict(payload),
        None,
    )


def test_fold_walks_a_task_through_its_lifecycle() -> None:
    rows = fold(
        [
            _recorded(1, EntityKind.TASK, "t", "submitted", name="f"),
            _recorded(2, EntityKind.TASK, "t", "running", worker_id="w"),
            _recorded(3, EntityKind.TASK, "t", "failed", error="boom"),
            _recorded(4, EntityKind.WORKER, "w", "started", pid=1),  # not projected
        ]
    )
    assert list(rows) == [("tasks", "t")]
    row = rows[("tasks", "t")]
    assert (row["state"], row["name"], row["worker_id"], row["error"]) == (
        "FAILED",
        "f",
        "w",
        "boom",
    )
    assert row["started_at"].second == 2 and row["ended_at"].second == 3
    assert row["last_position"] == 3 and row["attempt"] == 0


def test_a_schedulers_decision_id_is_a_uuid7_of_its_causes_recording() -> None:
    """Every scheduler gives a placement the same id (the log stores the first), shaped
    as a UUIDv7 of when the log recorded the spill, so that its duplicate check may skip
    the partitions sealed before (migration 0030)."""
    from controlplane.scheduler import decision_event_id

    spilled = _recorded(7, EntityKind.TASK, "t1", "spilled", attempt=0)
    placed = decision_event_id("t1:0", spilled)
    assert placed == decision_event_id("t1:0", spilled)  # another scheduler, the same
    assert placed != decision_event_id("t1:1", spilled)
    assert placed.version == 7 and placed.variant == uuid.RFC_4122
    assert placed.int >> 80 == int(spilled.recorded_at.timestamp() * 1000)


def test_global_scheduler_sends_a_spill_to_the_node_holding_its_arguments() -> None:
    from controlplane.scheduler import GlobalScheduler

    scheduler = GlobalScheduler("postgresql://unused")  # folds events only: no connection
    for position, (node, cpus) in enumerate([("a", 4), ("b", 4), ("c", 8)], 1):
        scheduler.apply(
            _recorded(
                position,
                EntityKind.NODE,
                node,
                "registered",
                address=f"{node}:1",
                resources={"CPU": cpus},
            )
        )
    busy_b = {"available": {"CPU": 0}, "load": {"pending_tasks": 2}}

    def spill(position: int, task: str, args: dict[str, dict[str, object]]) -> str | None:
        scheduler.apply(
            _recorded(
                position,
                EntityKind.TASK,
                task,
                "spilled",
                attempt=0,
                resources={"CPU": 1},
                args=args,
                from_node="a",
                strategy=None,
            )
        )
        node = scheduler.choose(scheduler.pending[task])
        return node.node_id if node else None

    big_on_b = {"o1": {"address": "b:1", "size": 200_000_000}, "o2": {"address": "c:1", "size": 10}}
    assert spill(10, "t1", big_on_b) == "b"  # where the bytes are, not c with more CPUs
    scheduler.apply(_recorded(11, EntityKind.NODE, "b", "heartbeat", **busy_b))
    assert spill(12, "t2", big_on_b) == "c"  # b has no room now: c, holding the rest
    assert spill(13, "t3", {}) == "c"  # no arguments: the most free CPU, off the spiller


def test_sweeping_a_dead_session_removes_its_nodes_segments() -> None:
    """A node killed outright leaves its segments; whoever sweeps its directory first
    removes them too (after that, nothing names their node any more)."""
    import subprocess
    import sys
    import tempfile
    import uuid
    from pathlib import Path

    from controlplane.session_dirs import PREFIX, sweep_stale
    from dataplane import shm

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    session = Path(tempfile.mkdtemp(prefix=PREFIX))
    node_id = uuid.uuid4().hex
    (session / "owner.pid").write_text(str(dead.pid))
    (session / "node.ready").write_text(node_id)
    segment = shm.SHM_DIR / f"{node_id}-{uuid.uuid4().hex}00000001"
    other = shm.SHM_DIR / f"{uuid.uuid4().hex}-{uuid.uuid4().hex}00000001"
    segment.write_bytes(b"x")
    other.write_bytes(b"y")
    try:
        assert session in sweep_stale()
        assert not session.exists() and not segment.exists()
        assert other.exists()  # another node's: not touched
    finally:
        segment.unlink(missing_ok=True)
        other.unlink(missing_ok=True)
