"""serving settings: per-version and per-alias micro-batch limits, and aliases warmed at worker start

Revision ID: 0012_serving_settings
Revises: 0011_attempt_device

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0012_serving_settings"
down_revision: Union[str, Sequence[str], None] = "0012_usage_totals"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_batch_size", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_delay_ms", sa.Integer(), nullable=True))
    with op.batch_alter_table("model_aliases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_batch_size", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_delay_ms", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("warm", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("model_aliases", schema=None) as batch_op:
        batch_op.drop_column("warm")
        batch_op.drop_column("max_delay_ms")
        batch_op.drop_column("max_batch_size")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("max_delay_ms")
        batch_op.drop_column("max_batch_size")
