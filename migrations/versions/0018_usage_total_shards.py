"""usage totals in shards: a user's totals may be spread over several rows, summed when read

Revision ID: 0018_usage_total_shards
Revises: 0017_list_version_shards

Every submit added one to its owner's single totals row, so on PostgreSQL concurrent submits of one
user queued on that row's lock, each until the one before had committed (and flushed the WAL): one
commit at a time, never grouped. A submit now adds to the row of its shard (its job id modulo
``app.usage.SHARDS``); readers sum a user's rows. Existing totals become shard 0.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = "0018_usage_total_shards"
down_revision: Union[str, Sequence[str], None] = "0017_list_version_shards"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Add ``shard`` (0 for the existing rows) to the primary key."""
    with op.batch_alter_table("usage_totals", recreate="auto") as batch_op:
        batch_op.add_column(sa.Column("shard", sa.SmallInteger(), server_default=sa.text("0"), nullable=False))
        batch_op.drop_constraint("pk_usage_totals", type_="primary")
        batch_op.create_primary_key("pk_usage_totals", ["user_id", "shard"])


def downgrade() -> None:
    """Fold every user's shards into one row, then drop ``shard``."""
    op.execute("""
        UPDATE usage_totals SET
            jobs = (SELECT sum(t.jobs) FROM usage_totals t WHERE t.user_id = usage_totals.user_id),
            attempts = (SELECT sum(t.attempts) FROM usage_totals t WHERE t.user_id = usage_totals.user_id),
            cpu_seconds = (SELECT sum(t.cpu_seconds) FROM usage_totals t WHERE t.user_id = usage_totals.user_id),
            gpu_seconds = (SELECT sum(t.gpu_seconds) FROM usage_totals t WHERE t.user_id = usage_totals.user_id)
        WHERE shard = 0""")
    op.execute("""
        INSERT INTO usage_totals (user_id, shard, jobs, attempts, cpu_seconds, gpu_seconds)
        SELECT user_id, 0, sum(jobs), sum(attempts), sum(cpu_seconds), sum(gpu_seconds) FROM usage_totals
        WHERE user_id NOT IN (SELECT user_id FROM usage_totals WHERE shard = 0) GROUP BY user_id""")
    op.execute("DELETE FROM usage_totals WHERE shard <> 0")
    with op.batch_alter_table("usage_totals", recreate="auto") as batch_op:
        batch_op.drop_constraint("pk_usage_totals", type_="primary")
        batch_op.create_primary_key("pk_usage_totals", ["user_id"])
        batch_op.drop_column("shard")
