"""an index of actor method calls by actor, for replaying an actor's calls

Revision ID: 0006_actor_calls_index
"""

from migrations import run_sql_file

revision = "0006_actor_calls_index"
down_revision = "0005_checkpoints"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0006_actor_calls_index.up")


def downgrade() -> None:
    run_sql_file("0006_actor_calls_index.down")
