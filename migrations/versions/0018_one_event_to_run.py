"""a task scheduled and run in one commit is one `running` event: the tasks view's
scheduled_at counts it

Revision ID: 0018_one_event_to_run
"""

from migrations import run_sql_file

revision = "0018_one_event_to_run"
down_revision = "0017_addressed_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0018_one_event_to_run.up")


def downgrade() -> None:
    run_sql_file("0018_one_event_to_run.down")
