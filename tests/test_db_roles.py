"""Database roles (issue 8, migration 0010), tried with real logins: the runtime role
(``cairn_runtime``) appends, rolls partitions over and reads, but cannot drop, alter,
truncate or delete from the log nor create anything; the audit role (``cairn_audit``)
cannot write at all; a private cluster's daemons connect as the runtime role."""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import secrets
import stat
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from log_rows import rows
from psycopg import sql
from workloads import Counter, square

import sdk as ray
from controlplane import schema
from controlplane.embedded_postgres import RUNTIME_ROLE, owner_url
from controlplane.eventlog import EntityKind, Event, EventAppender, Tailer
from controlplane.eventlog.partitions import PartitionManager
from controlplane.gcs import Gcs
from controlplane.membership import BOUND_AHEAD
from controlplane.postgres_install import wheel_install_dir
from controlplane.readonly_sql import AUDIT_ROLE, WriteRefusedError, run_readonly
from controlplane.sql import queries

pytestmark = pytest.mark.timeout(180)

PSQL = wheel_install_dir() / "bin" / "psql"
APPEND_ONE = (
    "SELECT * FROM cairn_append_v2(ARRAY[gen_random_uuid()], ARRAY['job-x'], "
    "ARRAY['job']::entity_kind[], ARRAY['job-x'], ARRAY['submitted'], ARRAY[NULL], "
    "ARRAY['{}'::jsonb], ARRAY[NULL::bytea])"
)
REFUSED = ("permission denied", "must be owner")


def login(url: str, role: str) -> str:
    """``url`` (a superuser's) as ``role``, which is given a login and a new password
    (roles are server-wide: tests may share them, each sets its own password)."""
    password = secrets.token_urlsafe(16)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{parts.hostname}:{parts.port}"))


def psql(url: str, statement: str) -> subprocess.CompletedProcess[str]:
    """One statement through the psql binary that ships with the server."""
    return subprocess.run(
        [str(PSQL), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-c", statement, url],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
    )


def assert_refused(url: str, statement: str) -> None:
    result = psql(url, statement)
    assert result.returncode != 0, f"{statement!r} was allowed: {result.stdout}"
    assert any(word in result.stderr for word in REFUSED), (statement, result.stderr)


def count_events(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    assert row is not None
    return int(row[0])


async def append(url: str, count: int, prefix: str) -> list[int]:
    async with EventAppender(url, max_batch=20) as appender:
        return await asyncio.gather(
            *(
                appender.append(
                    Event(EntityKind.OBJECT, f"{prefix}-{n}", "created", {"size_bytes": n})
                )
                for n in range(count)
            )
        )


def test_the_runtime_role_cannot_change_the_log(gcs_url: str) -> None:
    runtime = login(gcs_url, RUNTIME_ROLE)
    asyncio.run(append(runtime, 10, "before"))
    partition = PartitionManager(gcs_url).partitions()[0].table_name
    assert psql(runtime, "SELECT count(*) FROM events").stdout.strip() == "10"

    for statement in [
        "DROP TABLE events",
        "ALTER TABLE events ADD COLUMN extra int",
        "ALTER TABLE events DISABLE TRIGGER ALL",
        "TRUNCATE events",
        "DELETE FROM events",
        "UPDATE events SET event_type = 'forged'",
        "INSERT INTO events (position, event_id, recorded_at, entity_kind, entity_id, "
        "event_type) VALUES (99, gen_random_uuid(), now(), 'job', 'j', 'forged')",
        f"DELETE FROM {partition}",
        f"DROP TABLE {partition}",
        f"ALTER TABLE events DETACH PARTITION {partition}",
        f"CREATE INDEX ON {partition} (entity_id)",
        "UPDATE event_log_shards SET last_position = 0",
        "UPDATE event_partitions SET state = 'dropped'",
        "DELETE FROM node_liveness",
        "DELETE FROM subscriptions",
        "CREATE TABLE public.mine (x int)",
        "CREATE VIEW public.mine AS SELECT 1",
        "CREATE FUNCTION public.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE SCHEMA mine",
        "SELECT cairn_create_next_partition_v1()",
        # the failover epochs: recorded only by cairn_epoch_v1(), for a promotion
        "INSERT INTO gcs_epochs (epoch, timeline) VALUES (99, 99)",
        "UPDATE gcs_epochs SET epoch = 99",
        "DELETE FROM gcs_epochs",
        "SELECT cairn_live_timeline_v1()",
        # the log's identity (0013): drawn once by the migration, never rewritten
        "UPDATE gcs_identity SET cluster_id = gen_random_uuid()",
        "DELETE FROM gcs_identity",
        "INSERT INTO gcs_identity DEFAULT VALUES",
    ]:
        assert_refused(runtime, statement)
    assert count_events(gcs_url) == 10

    with psycopg.connect(gcs_url) as conn:
        attributes = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
            "FROM pg_roles WHERE rolname = %s",
            (RUNTIME_ROLE,),
        ).fetchone()
        creatable = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE has_schema_privilege(%s, oid, 'CREATE')",
            (RUNTIME_ROLE,),
        ).fetchall()
        owned = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relowner = %s::regrole", (RUNTIME_ROLE,)
        ).fetchone()
    assert attributes == (False, False, False, False, False)
    assert creatable == []
    assert owned == (0,)


def test_the_audit_role_cannot_write_at_all(gcs_url: str) -> None:
    runtime = login(gcs_url, RUNTIME_ROLE)
    asyncio.run(append(runtime, 5, "seen"))
    audit = login(gcs_url, AUDIT_ROLE)
    assert psql(audit, "SELECT count(*) FROM events").stdout.strip() == "5"
    for statement in [
        "INSERT INTO subscriptions (name) VALUES ('forged')",
        "INSERT INTO node_liveness (node_id, address) VALUES ('n', 'a')",
        "INSERT INTO checkpoints (name, position, state) VALUES ('c', 1, '')",
        "SELECT * FROM cairn_epoch_v1()",
        "SELECT * FROM cairn_identity_v1()",
        "UPDATE event_log_shards SET last_position = 0",
        "UPDATE events SET event_type = 'forged'",
        "DELETE FROM events",
        "DELETE FROM subscriptions",
        "DROP TABLE events",
        "DROP TABLE subscriptions",
        "TRUNCATE events",
        "TRUNCATE node_liveness",
        "ALTER TABLE events ADD COLUMN extra int",
        "CREATE TABLE public.mine (x int)",
        APPEND_ONE,
        "SELECT cairn_ensure_partitions_v1(1000000000)",
    ]:
        assert_refused(audit, statement)
    assert count_events(gcs_url) == 5


def test_the_runtime_role_appends_rolls_partitions_over_and_reads(gcs_url: str) -> None:
    owner = PartitionManager(gcs_url)
    owner.configure(partition_size=50, partitions_ahead=1)  # a setting: the owner's
    runtime = login(gcs_url, RUNTIME_ROLE)
    assert_refused(runtime, "UPDATE event_log_head SET partition_size = 10")

    positions = asyncio.run(append(runtime, 180, "o"))  # past the partitions made ahead
    assert sorted(positions) == list(range(1, 181))
    bounds = [(p.lower_bound, p.upper_bound) for p in owner.partitions()]
    assert bounds[:4] == [(1, 51), (51, 101), (101, 151), (151, 201)]
    assert PartitionManager(runtime).ensure_ahead() >= 1  # the runtime may make them ahead
    with psycopg.connect(gcs_url) as conn:
        owned_by_migrator = conn.execute(  # made by the runtime's appends, owned by the owner
            "SELECT DISTINCT c.relowner = current_user::regrole FROM event_partitions p "
            "JOIN pg_class c ON c.oid = to_regclass(p.table_name)"
        ).fetchall()
    assert owned_by_migrator == [(True,)]

    # history indexes of full partitions are DDL: the owner's upkeep, skipped by the runtime
    assert PartitionManager(runtime).index_full_partitions() == []
    assert len(owner.index_full_partitions()) == 3

    async def read_and_keep_rows() -> list[int]:
        async with Tailer(runtime, after=0) as tailer:
            seen: list[int] = []
            while len(seen) < 180:
                seen += [e.position for e in await tailer.read(wait=5)]
        conn = await psycopg.AsyncConnection.connect(runtime, autocommit=True)
        async with conn:
            for name, args in [
                ("register_liveness", ("node-1", "127.0.0.1:1", 0, BOUND_AHEAD)),
                ("ping_liveness", ("node-1", 0, BOUND_AHEAD)),
                ("owe_fence", ("node-1", 1)),
                ("fences_owed", ()),
                ("fence_placed", ("node-1", 1)),
                ("declare_node_gone", ("node-1",)),
                ("ensure_subscription", ("scheduler",)),
                ("save_subscription_position", ("scheduler", [180])),
                ("save_checkpoint", ("scheduler", [180], b"state")),
            ]:
                await conn.execute(_psycopg(queries[name]), _numbered(args))
        return seen

    assert asyncio.run(read_and_keep_rows()) == list(range(1, 181))
    saved = rows(gcs_url, "SELECT position FROM subscriptions WHERE name = 'scheduler'")
    assert [r["position"] for r in saved] == [180]
    # `cairn sql` with the runtime's URL reads as cairn_audit, and a write is refused
    columns, result = asyncio.run(run_readonly(runtime, "SELECT count(*) AS n FROM events"))
    assert (columns, result) == (["n"], [(180,)])
    with pytest.raises(WriteRefusedError):
        asyncio.run(run_readonly(runtime, f"SELECT * FROM ({APPEND_ONE}) a"))
    # a node joining with the runtime's URL opens the GCS: migrations at head are a no-op
    gcs = Gcs(runtime)
    assert gcs.start() == runtime
    assert count_events(gcs_url) == 180


def _psycopg(query: str) -> str:
    """A named query's ``$n`` placeholders in psycopg's form: ``%(n)s``, for a dict of
    the arguments by number (``_numbered``), whatever order they appear in."""
    return re.sub(r"\$(\d+)", r"%(\1)s", query)


def _numbered(args: tuple[object, ...]) -> dict[str, object]:
    return {str(n): arg for n, arg in enumerate(args, start=1)}


def test_the_migration_takes_its_grants_back_on_the_way_down(empty_db_url: str) -> None:
    schema.upgrade(empty_db_url, "0010_db_roles")  # (0019 replaced the function it grants)
    version = importlib.import_module("migrations.versions.0010_db_roles")
    checks = (
        "SELECT has_table_privilege(%s, 'node_liveness', 'INSERT'), "
        "EXISTS (SELECT 1 FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = 'events'::"
        "regclass AND a.grantee = %s::regrole), "
        "(SELECT prosecdef FROM pg_proc WHERE proname = 'cairn_append_v1'), "
        "has_function_privilege(%s, 'cairn_append_v1(uuid[], text[], entity_kind[], text[], "
        "text[], text[], jsonb[], bytea[])', 'EXECUTE')"
    )

    def privileges() -> tuple[bool, ...]:
        with psycopg.connect(empty_db_url) as conn:
            row = conn.execute(checks, (RUNTIME_ROLE, RUNTIME_ROLE, AUDIT_ROLE)).fetchone()
        assert row is not None
        return tuple(row)

    assert privileges() == (True, True, True, False)
    schema.downgrade(empty_db_url, version.down_revision)
    assert privileges() == (False, False, False, True)
    schema.upgrade(empty_db_url, "0010_db_roles")
    assert privileges() == (True, True, True, False)


def test_a_private_cluster_runs_as_the_runtime_role() -> None:
    from sdk.api import client_or_auto_init

    ray.init(num_cpus=2)
    try:
        assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
        counter = Counter.remote()
        assert ray.get([counter.add.remote(1) for _ in range(3)]) == [1, 2, 3]
        runtime = ray.get_runtime_context().gcs_address
        assert runtime is not None and urlsplit(runtime).username == RUNTIME_ROLE
        session_dir = Path(client_or_auto_init().welcome.session_dir)
        for secret in ("gcs_password", "gcs_runtime_password"):
            assert stat.S_IMODE((session_dir / secret).stat().st_mode) == 0o600
        owner = owner_url(runtime, session_dir)
        assert owner is not None and urlsplit(owner).username == "cairn"
        with psycopg.connect(owner) as conn:
            users = conn.execute(
                "SELECT usename, count(*) FROM pg_stat_activity WHERE datname = "
                "current_database() AND backend_type = 'client backend' "
                "AND pid <> pg_backend_pid() GROUP BY usename"
            ).fetchall()
        # the daemon's appender, tailer and liveness pinger, all as the runtime role
        assert [u for u, _ in users] == [RUNTIME_ROLE], users
        assert_refused(runtime, "TRUNCATE events")
    finally:
        ray.shutdown()
