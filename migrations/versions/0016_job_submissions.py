"""job submissions (the Jobs API): an entity kind of their own

Revision ID: 0016_job_submissions
"""

from migrations import run_sql_file

revision = "0016_job_submissions"
down_revision = "0015_runtime_env_packages"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0016_job_submissions.up")


def downgrade() -> None:
    run_sql_file("0016_job_submissions.down")
