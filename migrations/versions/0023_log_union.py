"""where the servers of a log on several lie, and the union of their events

Revision ID: 0023_log_union
"""

from migrations import run_sql_file

revision = "0023_log_union"
down_revision = "0022_fences_on_servers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0023_log_union.up")


def downgrade() -> None:
    run_sql_file("0023_log_union.down")
