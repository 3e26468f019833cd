"""an index of the nodes' events, for membership reads that stay fast as the log grows

Revision ID: 0014_node_events_index
"""

from migrations import run_sql_file

revision = "0014_node_events_index"
down_revision = "0013_gcs_identity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0014_node_events_index.up")


def downgrade() -> None:
    run_sql_file("0014_node_events_index.down")
