"""the log's union without servers that do not answer, for one session's audit queries

Revision ID: 0031_union_without_servers
"""

from migrations import run_sql_file

revision = "0031_union_without_servers"
down_revision = "0030_recent_event_ids"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0031_union_without_servers.up")


def downgrade() -> None:
    run_sql_file("0031_union_without_servers.down")
