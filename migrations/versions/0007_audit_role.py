"""a read-only role for audit queries (cairn sql)

Revision ID: 0007_audit_role
"""

from migrations import run_sql_file

revision = "0007_audit_role"
down_revision = "0006_actor_calls_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0007_audit_role.up")


def downgrade() -> None:
    run_sql_file("0007_audit_role.down")
