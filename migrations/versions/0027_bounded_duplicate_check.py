"""an append's duplicate check reads only the partitions that may hold its events

Revision ID: 0027_bounded_duplicate_check
"""

from migrations import run_sql_file

revision = "0027_bounded_duplicate_check"
down_revision = "0026_submission_index_predicate"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0027_bounded_duplicate_check.up")


def downgrade() -> None:
    run_sql_file("0027_bounded_duplicate_check.down")
