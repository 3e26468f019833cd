"""current-state projection tables

Revision ID: 0002_projections
"""

from migrations import run_sql_file

revision = "0002_projections"
down_revision = "0001_event_log"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0002_projections.up")


def downgrade() -> None:
    run_sql_file("0002_projections.down")
