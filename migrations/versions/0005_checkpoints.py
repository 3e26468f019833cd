"""checkpoints of folded state, so a restarted reader does not refold the whole log

Revision ID: 0005_checkpoints
"""

from migrations import run_sql_file

revision = "0005_checkpoints"
down_revision = "0004_entity_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0005_checkpoints.up")


def downgrade() -> None:
    run_sql_file("0005_checkpoints.down")
