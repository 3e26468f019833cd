"""the log's append and read functions run on generic plans (no planning per call)

Revision ID: 0025_generic_plans
"""

from migrations import run_sql_file

revision = "0025_generic_plans"
down_revision = "0024_reads_after_heads"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0025_generic_plans.up")


def downgrade() -> None:
    run_sql_file("0025_generic_plans.down")
