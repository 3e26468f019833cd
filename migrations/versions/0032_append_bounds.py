"""a node's appends to the log's other servers stay below a bound renewed by its pings,
so it can be declared dead while one of them is away

Revision ID: 0032_append_bounds
"""

from migrations import run_sql_file

revision = "0032_append_bounds"
down_revision = "0031_union_without_servers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0032_append_bounds.up")


def downgrade() -> None:
    run_sql_file("0032_append_bounds.down")
