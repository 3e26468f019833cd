"""GCS identity: a cluster id drawn once per log, and cairn_identity_v1(), which every
runtime connection asks first, so that a node refuses a GCS that was wiped, replaced
or put back from an older copy

Revision ID: 0013_gcs_identity
"""

from migrations import run_sql_file

revision = "0013_gcs_identity"
down_revision = "0012_node_fence"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0013_gcs_identity.up")


def downgrade() -> None:
    run_sql_file("0013_gcs_identity.down")
