"""an index of events by entity, for lineage look-ups

Revision ID: 0004_entity_index
"""

from migrations import run_sql_file

revision = "0004_entity_index"
down_revision = "0003_node_liveness"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0004_entity_index.up")


def downgrade() -> None:
    run_sql_file("0004_entity_index.down")
