"""the job submissions' partial index tests the enum label, not a function (no per-insert set-up)

Revision ID: 0026_submission_index_predicate
"""

from migrations import run_sql_file

revision = "0026_submission_index_predicate"
down_revision = "0025_generic_plans"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0026_submission_index_predicate.up")


def downgrade() -> None:
    run_sql_file("0026_submission_index_predicate.down")
