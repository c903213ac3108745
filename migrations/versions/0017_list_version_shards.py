"""job list versions: one shard per transaction under an advisory lock (PostgreSQL), so no deadlock

Revision ID: 0017_list_version_shards
Revises: 0016_job_counts

``0013_job_list_versions`` bumped each changed job's counters in shard ``id % 16``. A transaction
that changes several jobs (a micro-batch's claim or finish, the reaper, a bulk cancel) then locked
counter rows in an order of its own, and two such transactions could each hold a row the other
waits for: PostgreSQL broke the cycle by aborting one of them (a deadlock error; the work was
retried, nothing was lost, but it was wasted). Now all of one transaction's bumps go to shard
``txid % 16``, taken first under that shard's transaction-level advisory lock, the same lock
``0016_job_counts`` takes: transactions in one shard commit one after the other, transactions in
different shards touch different rows. A list's version is the sum of its owner's shards, so a
poll sees a new version for every committed change as before. SQLite has one writer at a time and
keeps its triggers.
"""
from typing import Sequence, Union

from alembic import op


revision: str = "0017_list_version_shards"
down_revision: Union[str, Sequence[str], None] = "0016_job_counts"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

SHARDS = 16  # app.models.JOB_LIST_SHARDS
LOCK_CLASS = 0x6B6A63  # the advisory lock of 0016_job_counts: one lock per transaction for both

_TX_BUMP = """INSERT INTO job_list_versions AS v (owner_id, shard, version, changed_by)
    VALUES ({row}.owner_id, tx_shard, 1, txid_current()), (0, tx_shard, 1, txid_current())
    ON CONFLICT (owner_id, shard) DO UPDATE SET version = v.version + 1, changed_by = EXCLUDED.changed_by
    WHERE v.changed_by IS DISTINCT FROM EXCLUDED.changed_by"""

UPGRADE = f"""CREATE OR REPLACE FUNCTION kiln_count_job_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    tx_shard smallint := txid_current() % {SHARDS};
BEGIN
    PERFORM pg_advisory_xact_lock({LOCK_CLASS}, tx_shard);
    IF TG_OP = 'DELETE' THEN
        {_TX_BUMP.format(row="OLD")};
        RETURN NULL;
    END IF;
    {_TX_BUMP.format(row="NEW")};
    IF TG_OP = 'UPDATE' AND NEW.owner_id IS DISTINCT FROM OLD.owner_id THEN
        {_TX_BUMP.format(row="OLD")};
    END IF;
    RETURN NULL;
END $$"""

_ROW_BUMP = """INSERT INTO job_list_versions AS v (owner_id, shard, version, changed_by)
    VALUES ({row}.owner_id, {row}.id % {shards}, 1, txid_current()), (0, {row}.id % {shards}, 1, txid_current())
    ON CONFLICT (owner_id, shard) DO UPDATE SET version = v.version + 1, changed_by = EXCLUDED.changed_by
    WHERE v.changed_by IS DISTINCT FROM EXCLUDED.changed_by"""

DOWNGRADE = f"""CREATE OR REPLACE FUNCTION kiln_count_job_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        {_ROW_BUMP.format(row="OLD", shards=SHARDS)};
        RETURN NULL;
    END IF;
    {_ROW_BUMP.format(row="NEW", shards=SHARDS)};
    IF TG_OP = 'UPDATE' AND NEW.owner_id IS DISTINCT FROM OLD.owner_id THEN
        {_ROW_BUMP.format(row="OLD", shards=SHARDS)};
    END IF;
    RETURN NULL;
END $$"""


def upgrade() -> None:
    """PostgreSQL: bump the transaction's shard under the shared advisory lock."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(UPGRADE)


def downgrade() -> None:
    """PostgreSQL: back to one shard per job (0013)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(DOWNGRADE)
