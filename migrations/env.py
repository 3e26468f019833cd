"""Alembic environment: runs online only, on a connection handed in by the caller
(controlplane.schema) or made from the ``sqlalchemy.url`` option."""

from alembic import context
from sqlalchemy import create_engine, text

# Serialises concurrent migrators (several nodes starting at once) on one database.
MIGRATION_LOCK_KEY = 0x6361_6972_6E00  # "cairn\0"


def run_migrations_online() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
        with engine.connect() as connection:
            _run(connection)
        engine.dispose()
    else:
        _run(connection)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, transactional_ddl=True)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        context.run_migrations()


run_migrations_online()
