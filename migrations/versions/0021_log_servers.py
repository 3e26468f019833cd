"""a log whose shards lie on several PostgreSQL servers: each server holds the heads of
its shards only, and appends take positions past the writer's clock

Revision ID: 0021_log_servers
"""

from migrations import run_sql_file

revision = "0021_log_servers"
down_revision = "0020_entity_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0021_log_servers.up")


def downgrade() -> None:
    run_sql_file("0021_log_servers.down")
