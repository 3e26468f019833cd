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
        migrations = context.get_context()
        before = migrations.get_current_revision()
        context.run_migrations()
        if (
            migrations.get_current_revision() != before
            and connection.execute(
                text("SELECT to_regprocedure('cairn_make_log_union_v1()') IS NOT NULL")
            ).scalar()
        ):
            # the union of the log's servers, made anew over the views as they are now
            # (migrations/sql/0023_log_union.up.sql), in the migrations' transaction
            connection.execute(text("SELECT cairn_make_log_union_v1()"))


run_migrations_online()
