"""runtime environments' packages (working_dir, py_modules), stored once by content digest

Revision ID: 0015_runtime_env_packages
"""

from migrations import run_sql_file

revision = "0015_runtime_env_packages"
down_revision = "0014_node_events_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0015_runtime_env_packages.up")


def downgrade() -> None:
    run_sql_file("0015_runtime_env_packages.down")
