"""database roles: the runtime appends through SECURITY DEFINER functions and writes
only liveness, positions, checkpoints and projections; cairn_audit reads

Revision ID: 0010_db_roles
"""

from migrations import run_sql_file

revision = "0010_db_roles"
down_revision = "0009_sql_views"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0010_db_roles.up")


def downgrade() -> None:
    run_sql_file("0010_db_roles.down")
