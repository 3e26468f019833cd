"""Alembic environment and versions for Cairn's schema (the event log and its projections).

The SQL of each version lives in ``sql/NNNN_name.up.sql`` / ``.down.sql`` so that the
schema can be read as SQL; the Python version files only run those files.
"""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
SQL_DIR = MIGRATIONS_DIR / "sql"


def run_sql_file(name: str) -> None:
    """Runs ``sql/<name>.sql`` on the migration's connection, as one multi-statement
    script: through the driver cursor, so that neither SQLAlchemy's bind-parameter
    syntax nor the driver's ``%`` placeholders touch the SQL."""
    from alembic import op

    script = (SQL_DIR / f"{name}.sql").read_text()
    dbapi_connection = op.get_bind().connection.dbapi_connection
    assert dbapi_connection is not None  # (None only once the connection is closed)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(script)
    finally:
        cursor.close()
