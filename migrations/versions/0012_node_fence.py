"""node fence: the log refuses the appends of a node declared dead (its old
incarnation, back from a partition) and records the refusal

Revision ID: 0012_node_fence
"""

from migrations import run_sql_file

revision = "0012_node_fence"
down_revision = "0011_gcs_epochs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0012_node_fence.up")


def downgrade() -> None:
    run_sql_file("0012_node_fence.down")
