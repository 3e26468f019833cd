"""Runs the alembic migrations in ``migrations/`` against a GCS URL."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine

from controlplane.gcs_url import sqlalchemy_url
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
    """Brings the schema up to ``revision``; safe to call from several processes."""
    _run(url, "upgrade", revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Takes the schema down to ``revision`` (``base``: nothing of Cairn's is left)."""
    _run(url, "downgrade", revision)
