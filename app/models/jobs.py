"""Jobs and their attempts: the rows that decide who runs what."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, SmallInteger, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.models.base import Base, UTCDateTime, utcnow


class Job(Base):
    """A training or prediction job. Its ``state`` is written only by :mod:`app.jobs.states`."""

    __tablename__ = "jobs"
    __table_args__ = (
        # A user's list newest first, and its state and kind filters, each read as one index range.
        Index("ix_jobs_owner_id_id", "owner_id", "id"),
        Index("ix_jobs_owner_id_state_id", "owner_id", "state", "id"),
        Index("ix_jobs_owner_id_kind_id", "owner_id", "kind", "id"),
        Index("ix_jobs_state_id", "state", "id"),
        Index("ix_jobs_state_lease_expires_at", "state", "lease_expires_at"),
        # Each queue's oldest waiting job, for the admin overview: the first entry of one index range.
        Index("ix_jobs_state_queue_queued_at", "state", "queue", "queued_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    queue: Mapped[str] = mapped_column(String(32))
    priority: Mapped[str] = mapped_column(String(16), default="normal")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The fencing token: the number of the newest attempt. A write carrying an older
    # number comes from a stale attempt and is refused.
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    pause_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    progress: Mapped[float] = mapped_column(default=0.0)
    epoch: Mapped[int] = mapped_column(default=0)
    step: Mapped[int] = mapped_column(default=0)
    resumed_from_epoch: Mapped[int | None] = mapped_column()
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_class: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL", use_alter=True)
    )
    # The exact version ``spec.init_from`` named at submit; NULL again if that version is deleted.
    init_model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL", use_alter=True)
    )
    # ``spec.webhook`` ({"url", "events"}) copied out of the spec, so a state change reads a small
    # column to learn whether to write an outbox row. NULL (SQL NULL): no webhook.
    webhook: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    attempt_rows: Mapped[list["Attempt"]] = relationship(
        back_populates="job", order_by="Attempt.number", cascade="all, delete-orphan"
    )


class Attempt(Base):
    """One run of a job by one worker process; ``number`` is its fencing token."""

    __tablename__ = "job_attempts"
    __table_args__ = (
        UniqueConstraint("job_id", "number", name="uq_job_attempts_job_id_number"),
        # The attempts that have not ended (workers online, running time so far): a few rows
        # however long the history, found without reading the ended ones.
        Index("ix_job_attempts_open", "job_id", sqlite_where=text("ended_at IS NULL"),
              postgresql_where=text("ended_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column()
    worker: Mapped[str] = mapped_column(String(200))
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column()
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Where the attempt resumed from (its checkpoint's position, 0 for a fresh start); NULL until
    # it has loaded that checkpoint, so an attempt lost before then claims no position.
    start_epoch: Mapped[int | None] = mapped_column()
    start_step: Mapped[int | None] = mapped_column()
    outcome: Mapped[str | None] = mapped_column(String(32))
    # The kind of device it ran on (cpu, cuda), for usage accounting; NULL for attempts from
    # before it was recorded (counted as CPU time).
    device: Mapped[str | None] = mapped_column(String(16))

    job: Mapped[Job] = relationship(back_populates="attempt_rows")


class JobListVersion(Base):
    """How many times the jobs of an owner changed, counted by the database: triggers on ``jobs``
    (migration ``0013_job_list_versions``) add one, in the transaction of the change, for every
    inserted, updated or deleted job (on PostgreSQL once per transaction and counter), to its
    owner's row and to owner 0's (every owner's), in shard ``job id % JOB_LIST_SHARDS`` so that
    concurrent writers seldom wait on one row. A list's
    version is the sum of its owner's shards: it grows with every change, so a list's ETag can be
    decided without reading a job. No foreign key: the rows outlive a deleted user, so sums never
    shrink back to a value they had."""

    __tablename__ = "job_list_versions"
    __table_args__ = {"postgresql_with": {"fillfactor": 50}}  # room for HOT updates of hot counters

    owner_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger)
    # PostgreSQL: the transaction that last bumped it (each bumps a counter once); NULL on SQLite.
    changed_by: Mapped[int | None] = mapped_column(BigInteger)


# Shards per owner of JobListVersion; the triggers of migration 0013 use the same number.
JOB_LIST_SHARDS = 16


class JobCount(Base):
    """How many jobs are in each state, kind and queue, kept by the database: triggers on ``jobs``
    (migration ``0016_job_counts``) add or take one, in the transaction of the change, for every
    inserted or deleted job and every update that changes its state, kind or queue, in one of
    ``JOB_COUNT_SHARDS`` shards (on PostgreSQL the transaction's, under that shard's advisory lock,
    so concurrent writers neither deadlock nor, in different shards, wait). A count is the sum of
    its shards (one shard alone may be negative): the admin overview and ``/metrics`` read them
    without counting jobs."""

    __tablename__ = "job_counts"
    __table_args__ = {"postgresql_with": {"fillfactor": 50}}  # room for HOT updates of hot counters

    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    queue: Mapped[str] = mapped_column(String(32), primary_key=True)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    jobs: Mapped[int] = mapped_column(BigInteger)


# Shards of each JobCount; the triggers of migration 0016 use the same number.
JOB_COUNT_SHARDS = 16
