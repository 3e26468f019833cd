"""node liveness pings

Revision ID: 0003_node_liveness
"""

from migrations import run_sql_file

revision = "0003_node_liveness"
down_revision = "0002_projections"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0003_node_liveness.up")


def downgrade() -> None:
    run_sql_file("0003_node_liveness.down")
