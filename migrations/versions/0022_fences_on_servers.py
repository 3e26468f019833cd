"""a dead node's fence on every server of a log on several

Revision ID: 0022_fences_on_servers
"""

from migrations import run_sql_file

revision = "0022_fences_on_servers"
down_revision = "0021_log_servers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0022_fences_on_servers.up")


def downgrade() -> None:
    run_sql_file("0022_fences_on_servers.down")
