"""Test fixtures: one real PostgreSQL server per test session (embedded, or the one named
by ``CAIRN_TEST_GCS_URL``), a migrated template database, and a fresh database per
test made from the template (CREATE DATABASE ... TEMPLATE, procrastinate's trick)."""

from __future__ import annotations

import compileall
import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from controlplane import schema
from controlplane.embedded_postgres import EmbeddedPostgres

TEMPLATE_DB = "cairn_test_template"
ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compiles the project's packages once. The suite starts thousands of Python
    processes (node daemons, workers, drivers, the command line); where
    ``PYTHONDONTWRITEBYTECODE`` is set (as in the image these machines run) none writes
    the bytecode it compiles, so each would compile every module it imports anew (~0.5 s
    a daemon)."""
    for package in ("controlplane", "dataplane", "sdk", "migrations"):
        compileall.compile_dir(ROOT / package, quiet=1)


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    external = os.environ.get("CAIRN_TEST_GCS_URL")
    if external:
        yield external
        return
    server = EmbeddedPostgres()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def template_url(pg_server_url: str) -> str:
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    url = with_database(pg_server_url, TEMPLATE_DB)
    schema.upgrade(url)
    return url


@contextlib.contextmanager
def scratch_database(server_url: str, template: str | None = None) -> Iterator[str]:
    """A database made for one test (empty, or a copy of ``template``), dropped after."""
    name = f"cairn_test_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{clause}')
    try:
        yield with_database(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_db_url(pg_server_url: str) -> Iterator[str]:
    """A fresh database with no schema at all."""
    with scratch_database(pg_server_url) as url:
        yield url


@pytest.fixture
def log_shards() -> int:
    """How many shards ``gcs_url``'s log has: 1, unless a module asks for more (a
    parametrized ``log_shards`` fixture of its own runs its tests on a sharded log too)."""
    return 1


@pytest.fixture
def gcs_url(pg_server_url: str, template_url: str, log_shards: int) -> Iterator[str]:
    """A fresh, migrated database for one test, its log in ``log_shards`` shards."""
    with scratch_database(pg_server_url, TEMPLATE_DB) as url:
        if log_shards > 1:
            schema.set_log_shards(url, log_shards)
        yield url


@pytest.fixture(scope="module")
def module_gcs_url(pg_server_url: str, template_url: str) -> Iterator[str]:
    """A fresh, migrated database for the tests of one module (a cluster they share,
    whose log outlives it)."""
    with scratch_database(pg_server_url, TEMPLATE_DB) as url:
        yield url


@pytest.fixture(scope="module")
def private_cluster() -> Iterator[None]:
    """One private cluster (``sdk.init``, 2 CPUs, its own embedded PostgreSQL) for the
    tests of a module that marks ``pytest.mark.usefixtures("private_cluster")``."""
    import sdk

    sdk.init(num_cpus=2)
    try:
        yield
    finally:
        sdk.shutdown()
