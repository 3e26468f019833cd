"""a one-event append in fewer statements; an append and its readers' wake-up in one call

Revision ID: 0029_appends_in_one_round_trip
"""

from migrations import run_sql_file

revision = "0029_appends_in_one_round_trip"
down_revision = "0028_named_actors_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0029_appends_in_one_round_trip.up")


def downgrade() -> None:
    run_sql_file("0029_appends_in_one_round_trip.down")
