"""GCS epochs: the fencing token of failover. Each promotion of a replica (a new
PostgreSQL timeline) is recorded as a new epoch, and appenders refuse a server whose
epoch is behind one they have seen

Revision ID: 0011_gcs_epochs
"""

from migrations import run_sql_file

revision = "0011_gcs_epochs"
down_revision = "0010_db_roles"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0011_gcs_epochs.up")


def downgrade() -> None:
    run_sql_file("0011_gcs_epochs.down")
