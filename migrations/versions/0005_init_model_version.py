"""pin the model a fine-tune starts from

Revision ID: 0003_init_model_version
Revises: 0002
Create Date: 2026-12-01 10:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0003_init_model_version'
down_revision: Union[str, Sequence[str], None] = '0003_attempt_start_nullable'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Add jobs.init_model_version_id, the model version a fine-tune was pinned to at submit."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('init_model_version_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(op.f('fk_jobs_init_model_version_id_model_versions'), 'model_versions',
                                    ['init_model_version_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    """Drop jobs.init_model_version_id."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('fk_jobs_init_model_version_id_model_versions'), type_='foreignkey')
        batch_op.drop_column('init_model_version_id')
