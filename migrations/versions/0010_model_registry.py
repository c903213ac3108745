"""model registry: aliases, lineage, stored input schema and soft deletion of model versions

Revision ID: 0008_model_registry
Revises: 0003_api_token_expiry
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0008_model_registry"
down_revision: Union[str, Sequence[str], None] = "0008_webhooks"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Add model_versions.input_schema, lineage and deleted_at, and the model_aliases table."""
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("input_schema", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("lineage", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "model_aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("alias", sa.String(length=100), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"],
                                name=op.f("fk_model_aliases_model_version_id_model_versions"), ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name=op.f("fk_model_aliases_owner_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_aliases")),
        sa.UniqueConstraint("owner_id", "name", "alias", name="uq_model_aliases_owner_name_alias"),
    )
    with op.batch_alter_table("model_aliases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_aliases_model_version_id"), ["model_version_id"], unique=False)


def downgrade() -> None:
    """Drop the aliases table and the new model_versions columns."""
    with op.batch_alter_table("model_aliases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_aliases_model_version_id"))
    op.drop_table("model_aliases")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_column("deleted_at")
        batch_op.drop_column("lineage")
        batch_op.drop_column("input_schema")
