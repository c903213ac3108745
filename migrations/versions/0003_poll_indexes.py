"""indexes for job lists (owner + state/kind filters, newest first) and one scope's metrics

Revision ID: 0003_poll_indexes
Revises: 0002
"""
from typing import Sequence, Union

from alembic import op

revision: str = "0003_poll_indexes"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Add the list, cursor, filter and metrics-scope indexes."""
    op.create_index("ix_jobs_owner_id_state_id", "jobs", ["owner_id", "state", "id"])
    op.create_index("ix_jobs_owner_id_kind_id", "jobs", ["owner_id", "kind", "id"])
    op.create_index("ix_jobs_state_id", "jobs", ["state", "id"])
    op.create_index("ix_metrics_job_id_scope_id", "metrics", ["job_id", "scope", "id"])


def downgrade() -> None:
    """Drop them."""
    op.drop_index("ix_metrics_job_id_scope_id", table_name="metrics")
    op.drop_index("ix_jobs_state_id", table_name="jobs")
    op.drop_index("ix_jobs_owner_id_kind_id", table_name="jobs")
    op.drop_index("ix_jobs_owner_id_state_id", table_name="jobs")
