"""events addressed to their readers: indexes for each node's and the global
scheduler's filtered reads of the log

Revision ID: 0017_addressed_events
"""

from migrations import run_sql_file

revision = "0017_addressed_events"
down_revision = "0016_job_submissions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0017_addressed_events.up")


def downgrade() -> None:
    run_sql_file("0017_addressed_events.down")
