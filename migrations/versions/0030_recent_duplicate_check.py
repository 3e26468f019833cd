"""an append's duplicate check reads only the partitions that may hold a copy

Revision ID: 0030_recent_duplicate_check
"""

from migrations import run_sql_file

revision = "0030_recent_duplicate_check"
down_revision = "0029_appends_in_one_round_trip"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0030_recent_duplicate_check.up")


def downgrade() -> None:
    run_sql_file("0030_recent_duplicate_check.down")
