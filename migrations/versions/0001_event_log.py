"""the event log, partitions, head, append function

Revision ID: 0001_event_log
"""

from migrations import run_sql_file

revision = "0001_event_log"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0001_event_log.up")


def downgrade() -> None:
    run_sql_file("0001_event_log.down")
