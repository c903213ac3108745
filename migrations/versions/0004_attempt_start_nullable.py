"""attempt start position nullable: unknown until the attempt has loaded its checkpoint

Revision ID: 0003_attempt_start_nullable
Revises: 0002

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0003_attempt_start_nullable'
down_revision: Union[str, Sequence[str], None] = "0003_poll_indexes"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('job_attempts', schema=None) as batch_op:
        batch_op.alter_column('start_epoch', existing_type=sa.Integer(), nullable=True)
        batch_op.alter_column('start_step', existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    """Downgrade schema (an attempt that never started reads as starting from 0)."""
    op.execute("UPDATE job_attempts SET start_epoch = 0 WHERE start_epoch IS NULL")
    op.execute("UPDATE job_attempts SET start_step = 0 WHERE start_step IS NULL")
    with op.batch_alter_table('job_attempts', schema=None) as batch_op:
        batch_op.alter_column('start_step', existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column('start_epoch', existing_type=sa.Integer(), nullable=False)
