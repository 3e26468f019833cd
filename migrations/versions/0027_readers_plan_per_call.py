"""a reader's read is planned per call again (a generic plan made early scanned the pkey)

Revision ID: 0027_readers_plan_per_call
"""

from migrations import run_sql_file

revision = "0027_readers_plan_per_call"
down_revision = "0026_submission_index_predicate"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0027_readers_plan_per_call.up")


def downgrade() -> None:
    run_sql_file("0027_readers_plan_per_call.down")
