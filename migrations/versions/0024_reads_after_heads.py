"""a reader's heads, then its events up to them (a partition attached meanwhile is read)

Revision ID: 0024_reads_after_heads
"""

from migrations import run_sql_file

revision = "0024_reads_after_heads"
down_revision = "0023_log_union"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0024_reads_after_heads.up")


def downgrade() -> None:
    run_sql_file("0024_reads_after_heads.down")
