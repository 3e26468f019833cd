"""Runs the alembic migrations in ``migrations/`` against a GCS URL."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine

from controlplane.errors import GcsError
from controlplane.gcs_url import normalize, sqlalchemy_url
from migrations import MIGRATIONS_DIR


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _run(url: str, action: str, revision: str) -> None:
    engine = create_engine(sqlalchemy_url(url), poolclass=None)
    try:
        with engine.begin() as connection:
            config = _config()
            config.attributes["connection"] = connection
            getattr(command, action)(config, revision)
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Brings the schema up to ``revision``; safe to call from several processes (each
    run that migrates also makes the log's union anew: migrations/env.py)."""
    _run(url, "upgrade", revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Takes the schema down to ``revision`` (``base``: nothing of Cairn's is left)."""
    _run(url, "downgrade", revision)


def log_shards(url: str) -> int:
    """How many shards the log has (migrations/sql/0019_sharded_log.up.sql)."""
    with psycopg.connect(normalize(url), autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT shard_count FROM event_log_head WHERE id = 1").fetchone()
    assert row is not None
    return int(row[0])


def set_log_shards(url: str, count: int) -> None:
    """Gives the log ``count`` shards from now on (a new GCS's, or a log that has events:
    theirs stay where they are, what comes next goes to the new shards). The owner's
    URL: it may build the shards' index. Not for a log on several servers, whose shards
    are placed when it is made (``set_log_servers``)."""
    with psycopg.connect(normalize(url), autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT server_count FROM event_log_head WHERE id = 1").fetchone()
        if row is not None and row[0] > 1:
            raise GcsError(
                f"the log lies on {row[0]} servers: its shards were placed when it was made "
                "and cannot be changed"
            )
        conn.execute("SELECT cairn_set_log_shards_v1(%s)", (count,))


def set_log_servers(urls: Sequence[str], shards: int) -> None:
    """Makes one log of ``shards`` shards on the servers of ``urls`` (each a migrated,
    empty GCS database, owners' URLs): shard s on server ``s % len(urls)``
    (migrations/sql/0021_log_servers.up.sql)."""
    for index, url in enumerate(urls):
        with psycopg.connect(normalize(url), autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT cairn_set_log_shards_v1(%s)", (shards,))
            conn.execute("SELECT cairn_set_log_server_v1(%s, %s)", (index, len(urls)))
