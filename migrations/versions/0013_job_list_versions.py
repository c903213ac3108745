"""job list versions: triggers count every change of a user's jobs, so a list's 304 reads no job

Revision ID: 0013_job_list_versions
Revises: 0012_metric_curves

Every INSERT, UPDATE and DELETE of a ``jobs`` row adds one to ``job_list_versions`` for the job's
owner and for owner 0 (every owner), in shard ``id % 16``, in the same transaction. On PostgreSQL
the trigger is a deferred constraint trigger: it runs at commit, after every row lock the
transaction takes on ``jobs``, so the counter rows are locked last and briefly (no lock-order
deadlock with other job writers); and it bumps each counter once per transaction (``changed_by``
holds the transaction's id), so a bulk change of many jobs stays linear. Existing jobs are counted
once each.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = "0013_job_list_versions"
down_revision: Union[str, Sequence[str], None] = "0012_metric_curves"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

SHARDS = 16  # app.models.JOB_LIST_SHARDS

_BUMP = """INSERT INTO job_list_versions AS v (owner_id, shard, version)
    VALUES ({row}.owner_id, {row}.id % {shards}, 1), (0, {row}.id % {shards}, 1)
    ON CONFLICT (owner_id, shard) DO UPDATE SET version = v.version + 1"""
# PostgreSQL: once per transaction and counter. A counter a transaction already bumped is left as
# it is (one new version per committed transaction is all a poll can tell apart), so a statement
# that changes 100,000 jobs does not pile 100,000 versions of one row into its transaction.
_PG_BUMP = """INSERT INTO job_list_versions AS v (owner_id, shard, version, changed_by)
    VALUES ({row}.owner_id, {row}.id % {shards}, 1, txid_current()), (0, {row}.id % {shards}, 1, txid_current())
    ON CONFLICT (owner_id, shard) DO UPDATE SET version = v.version + 1, changed_by = EXCLUDED.changed_by
    WHERE v.changed_by IS DISTINCT FROM EXCLUDED.changed_by"""

POSTGRESQL = [
    f"""CREATE FUNCTION kiln_count_job_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        {_PG_BUMP.format(row="OLD", shards=SHARDS)};
        RETURN NULL;
    END IF;
    {_PG_BUMP.format(row="NEW", shards=SHARDS)};
    IF TG_OP = 'UPDATE' AND NEW.owner_id IS DISTINCT FROM OLD.owner_id THEN
        {_PG_BUMP.format(row="OLD", shards=SHARDS)};
    END IF;
    RETURN NULL;
END $$""",
    """CREATE CONSTRAINT TRIGGER kiln_count_job_change AFTER INSERT OR UPDATE OR DELETE ON jobs
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION kiln_count_job_change()""",
]
_SQLITE_BUMP = _BUMP.replace("AS v ", "").replace("v.version", "version")
SQLITE = [
    f"""CREATE TRIGGER kiln_count_job_insert AFTER INSERT ON jobs BEGIN
    {_SQLITE_BUMP.format(row="NEW", shards=SHARDS)};
END""",
    f"""CREATE TRIGGER kiln_count_job_update AFTER UPDATE ON jobs BEGIN
    {_SQLITE_BUMP.format(row="NEW", shards=SHARDS)};
    INSERT INTO job_list_versions (owner_id, shard, version)
    SELECT OLD.owner_id, OLD.id % {SHARDS}, 1 WHERE OLD.owner_id IS NOT NEW.owner_id
    ON CONFLICT (owner_id, shard) DO UPDATE SET version = version + 1;
END""",
    f"""CREATE TRIGGER kiln_count_job_delete AFTER DELETE ON jobs BEGIN
    {_SQLITE_BUMP.format(row="OLD", shards=SHARDS)};
END""",
]


def upgrade() -> None:
    """Create job_list_versions, count the existing jobs, and add the triggers."""
    op.create_table(
        "job_list_versions",
        sa.Column("owner_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("shard", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("changed_by", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("owner_id", "shard", name=op.f("pk_job_list_versions")),
    )
    op.execute(f"INSERT INTO job_list_versions (owner_id, shard, version) "
               f"SELECT owner_id, id % {SHARDS}, count(*) FROM jobs GROUP BY owner_id, id % {SHARDS}")
    op.execute(f"INSERT INTO job_list_versions (owner_id, shard, version) "
               f"SELECT 0, id % {SHARDS}, count(*) FROM jobs GROUP BY id % {SHARDS}")
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:
        # Room on each page for the next versions of its counters (HOT updates, no index bloat).
        op.execute("ALTER TABLE job_list_versions SET (fillfactor = 50)")
    for statement in POSTGRESQL if postgresql else SQLITE:
        op.execute(statement)


def downgrade() -> None:
    """Drop the triggers and job_list_versions."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER kiln_count_job_change ON jobs")
        op.execute("DROP FUNCTION kiln_count_job_change()")
    else:
        for name in ("kiln_count_job_insert", "kiln_count_job_update", "kiln_count_job_delete"):
            op.execute(f"DROP TRIGGER {name}")
    op.drop_table("job_list_versions")
