"""API tokens may expire: api_tokens.expires_at (NULL: never).

Revision ID: 0003_api_token_expiry
Revises: 0003_user_roles_passwords
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003_api_token_expiry"
down_revision: Union[str, Sequence[str], None] = "0003_user_roles_passwords"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Add the nullable expiry column."""
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop the expiry column."""
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_column("expires_at")
