"""job counts: triggers keep the number of jobs per state, kind and queue, so the admin overview counts no job

Revision ID: 0016_job_counts
Revises: 0012_serving_settings

Every INSERT and DELETE of a ``jobs`` row, and every UPDATE that changes its state, kind or queue,
adds or takes one from ``job_counts`` for the row's (state, kind, queue), in the same transaction,
so the sums over the shards are exact at every commit. On SQLite (one writer at a time) the shard
is ``id % 16``. On PostgreSQL the trigger is a deferred constraint trigger, as
``0013_job_list_versions``'s: it runs at commit, after every row lock the transaction takes on
``jobs``, so the counter rows are locked last and briefly; and all of one transaction's counts go
to one shard, ``txid % 16``, taken under that shard's transaction-level advisory lock first. Two
transactions therefore never hold counter rows while waiting for each other's (a claim's
queued -> running and a reaper's running -> queued would otherwise lock the same two rows in
opposite orders), and transactions in different shards never wait at all. A shard's count may go
below zero (a job counted in one shard leaves from another); only the sums mean anything.
An index on (state, queue, queued_at) answers each queue's oldest wait from its first entry.
Existing jobs are counted once each.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = "0016_job_counts"
down_revision: Union[str, Sequence[str], None] = "0012_serving_settings"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

SHARDS = 16  # app.models.JOB_COUNT_SHARDS

_ADD = """INSERT INTO job_counts AS c (state, kind, queue, shard, jobs)
    VALUES ({row}.state, {row}.kind, {row}.queue, {row}.id % {shards}, {delta})
    ON CONFLICT (state, kind, queue, shard) DO UPDATE SET jobs = c.jobs + {delta}"""


def _add(row: str, delta: int, sqlite: bool = False) -> str:
    statement = _ADD.format(row=row, shards=SHARDS, delta=delta)
    return statement.replace("AS c ", "").replace("c.jobs", "jobs") if sqlite else statement


# The advisory lock's first key: "kiln job counts"; its second is the shard.
LOCK_CLASS = 0x6B6A63  # "kjc"
_PG_ADD = """INSERT INTO job_counts AS c (state, kind, queue, shard, jobs)
    VALUES ({row}.state, {row}.kind, {row}.queue, tx_shard, {delta})
    ON CONFLICT (state, kind, queue, shard) DO UPDATE SET jobs = c.jobs + {delta}"""

POSTGRESQL = [
    f"""CREATE FUNCTION kiln_count_job_state() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    tx_shard smallint := txid_current() % {SHARDS};
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.state = OLD.state AND NEW.kind = OLD.kind AND NEW.queue = OLD.queue THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock({LOCK_CLASS}, tx_shard);
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        {_PG_ADD.format(row="OLD", delta=-1)};
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        {_PG_ADD.format(row="NEW", delta=1)};
    END IF;
    RETURN NULL;
END $$""",
    """CREATE CONSTRAINT TRIGGER kiln_count_job_state AFTER INSERT OR UPDATE OF state, kind, queue OR DELETE ON jobs
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION kiln_count_job_state()""",
]
SQLITE = [
    f"""CREATE TRIGGER kiln_count_job_state_insert AFTER INSERT ON jobs BEGIN
    {_add("NEW", 1, sqlite=True)};
END""",
    f"""CREATE TRIGGER kiln_count_job_state_update AFTER UPDATE OF state, kind, queue ON jobs
    WHEN NEW.state IS NOT OLD.state OR NEW.kind IS NOT OLD.kind OR NEW.queue IS NOT OLD.queue BEGIN
    {_add("OLD", -1, sqlite=True)};
    {_add("NEW", 1, sqlite=True)};
END""",
    f"""CREATE TRIGGER kiln_count_job_state_delete AFTER DELETE ON jobs BEGIN
    {_add("OLD", -1, sqlite=True)};
END""",
]


def upgrade() -> None:
    """Create job_counts, count the existing jobs, add the triggers and the queue-wait index."""
    op.create_table(
        "job_counts",
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("queue", sa.String(length=32), nullable=False),
        sa.Column("shard", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("jobs", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("state", "kind", "queue", "shard", name=op.f("pk_job_counts")),
    )
    op.execute(f"INSERT INTO job_counts (state, kind, queue, shard, jobs) "
               f"SELECT state, kind, queue, id % {SHARDS}, count(*) FROM jobs GROUP BY state, kind, queue, id % {SHARDS}")
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:
        op.execute("ALTER TABLE job_counts SET (fillfactor = 50)")  # room for HOT updates of hot counters
    for statement in POSTGRESQL if postgresql else SQLITE:
        op.execute(statement)
    op.create_index("ix_jobs_state_queue_queued_at", "jobs", ["state", "queue", "queued_at"])


def downgrade() -> None:
    """Drop the index, the triggers and job_counts."""
    op.drop_index("ix_jobs_state_queue_queued_at", table_name="jobs")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER kiln_count_job_state ON jobs")
        op.execute("DROP FUNCTION kiln_count_job_state()")
    else:
        for name in ("kiln_count_job_state_insert", "kiln_count_job_state_update", "kiln_count_job_state_delete"):
            op.execute(f"DROP TRIGGER {name}")
    op.drop_table("job_counts")
