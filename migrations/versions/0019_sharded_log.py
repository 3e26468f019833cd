"""the sharded log: S heads, each appending on its own, positions that order causes
before effects across shards

Revision ID: 0019_sharded_log
"""

from migrations import run_sql_file

revision = "0019_sharded_log"
down_revision = "0018_one_event_to_run"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0019_sharded_log.up")


def downgrade() -> None:
    run_sql_file("0019_sharded_log.down")
