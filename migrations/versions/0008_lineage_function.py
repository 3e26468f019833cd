"""lineage(object_id): every task and object upstream of an object, from the log

Revision ID: 0008_lineage_function
"""

from migrations import run_sql_file

revision = "0008_lineage_function"
down_revision = "0007_audit_role"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0008_lineage_function.up")


def downgrade() -> None:
    run_sql_file("0008_lineage_function.down")
