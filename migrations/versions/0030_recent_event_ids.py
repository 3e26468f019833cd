"""an append's duplicate check reads only the recent partitions when they hold every copy

Revision ID: 0030_recent_event_ids
"""

from migrations import run_sql_file

revision = "0030_recent_event_ids"
down_revision = "0029_appends_in_one_round_trip"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0030_recent_event_ids.up")


def downgrade() -> None:
    run_sql_file("0030_recent_event_ids.down")
