"""metric curves: each metric's curve in packed chunks (every point, and block summaries), so a
downsampled poll reads no reports

Revision ID: 0012_metric_curves
Revises: 0011_attempt_device

Jobs recorded before this revision have no chunks: their curves are read from their reports
(``app.jobs.metric_curves`` takes every report after the chunks' ``covered_id`` from ``metrics``),
as fast as before; the next report a running job writes folds its whole series into chunks.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = "0012_metric_curves"
down_revision: Union[str, Sequence[str], None] = "0011_attempt_device"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Create metric_curve_chunks."""
    op.create_table(
        "metric_curve_chunks",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("level", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("chunk", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("covered_id", sa.Integer(), nullable=False),
        sa.Column("points", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_metric_curve_chunks_job_id_jobs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "scope", "name", "level", "chunk", name=op.f("pk_metric_curve_chunks")),
    )


def downgrade() -> None:
    """Drop metric_curve_chunks."""
    op.drop_table("metric_curve_chunks")
