"""an event of a job's entity names the job, so that the entity's history lies in the
job's shard

Revision ID: 0020_entity_jobs
"""

from migrations import run_sql_file

revision = "0020_entity_jobs"
down_revision = "0019_sharded_log"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0020_entity_jobs.up")


def downgrade() -> None:
    run_sql_file("0020_entity_jobs.down")
