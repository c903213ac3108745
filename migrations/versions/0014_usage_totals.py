"""usage totals: per-user jobs, attempts and ended run time, and an index of the attempts not ended

Revision ID: 0012_usage_totals
Revises: 0011_attempt_device

The admin dashboard read usage by summing every attempt on each poll; it now reads these totals,
which the services keep in the transactions that submit jobs, claim attempts and end them. The
upgrade fills them from the existing rows with the sums the dashboard used to compute.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = "0012_usage_totals"
down_revision: Union[str, Sequence[str], None] = "0013_job_list_versions"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Run time of an ended attempt ``a`` in seconds, per dialect (as the dashboard's query computed it).
SECONDS = {"sqlite": "(julianday(a.ended_at) - julianday(a.started_at)) * 86400.0",
           "postgresql": "EXTRACT(EPOCH FROM a.ended_at - a.started_at)"}
BACKFILL = """
INSERT INTO usage_totals (user_id, jobs, attempts, cpu_seconds, gpu_seconds)
SELECT u.id,
       (SELECT count(*) FROM jobs j WHERE j.owner_id = u.id),
       (SELECT count(*) FROM job_attempts a JOIN jobs j ON j.id = a.job_id WHERE j.owner_id = u.id),
       COALESCE((SELECT sum({seconds}) FROM job_attempts a JOIN jobs j ON j.id = a.job_id
                 WHERE j.owner_id = u.id AND a.ended_at IS NOT NULL AND (a.device IS NULL OR a.device <> 'cuda')), 0),
       COALESCE((SELECT sum({seconds}) FROM job_attempts a JOIN jobs j ON j.id = a.job_id
                 WHERE j.owner_id = u.id AND a.ended_at IS NOT NULL AND a.device = 'cuda'), 0)
FROM users u
WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.owner_id = u.id)
"""


def upgrade() -> None:
    """Create usage_totals and fill it; index the attempts that have not ended."""
    op.create_table(
        "usage_totals",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("jobs", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("cpu_seconds", sa.Double(), nullable=False),
        sa.Column("gpu_seconds", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_usage_totals_user_id_users", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", name="pk_usage_totals"),
    )
    op.create_index("ix_job_attempts_open", "job_attempts", ["job_id"], sqlite_where=sa.text("ended_at IS NULL"),
                    postgresql_where=sa.text("ended_at IS NULL"))
    bind = op.get_bind()
    op.execute(BACKFILL.format(seconds=SECONDS[bind.dialect.name]))


def downgrade() -> None:
    """Drop the index and the totals."""
    op.drop_index("ix_job_attempts_open", table_name="job_attempts")
    op.drop_table("usage_totals")
