"""named actors are found in the whole log: an index of the named actors' creations

Revision ID: 0028_named_actors_index
"""

from migrations import run_sql_file

revision = "0028_named_actors_index"
down_revision = "0027_readers_plan_per_call"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0028_named_actors_index.up")


def downgrade() -> None:
    run_sql_file("0028_named_actors_index.down")
