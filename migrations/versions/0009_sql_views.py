"""the SQL surface: views over the log (jobs, tasks, task_attempts, objects, actors,
actor_calls, nodes, placement_groups); the projection tables move to schema projection

Revision ID: 0009_sql_views
"""

from migrations import run_sql_file

revision = "0009_sql_views"
down_revision = "0008_lineage_function"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0009_sql_views.up")


def downgrade() -> None:
    run_sql_file("0009_sql_views.down")
