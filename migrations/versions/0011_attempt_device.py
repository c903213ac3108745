"""attempt device: the kind of device an attempt ran on, for CPU and GPU usage

Revision ID: 0011_attempt_device
Revises: 0008_model_registry

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0011_attempt_device"
down_revision: Union[str, Sequence[str], None] = "0008_model_registry"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("device", sa.String(length=16), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.drop_column("device")
