"""Webhook deliveries (the outbox: one row per event a job's webhook wants) and their attempts (the log)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, UTCDateTime, utcnow


class WebhookDelivery(Base):
    """One event to POST to a job's webhook, written in the transaction that recorded the event."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_job_id_id", "job_id", "id"),
        # The sweeper's scan: unfinished rows that are due.
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    # The ``webhook-id`` header: the same on every retry, so a receiver can drop duplicates.
    message_id: Mapped[str] = mapped_column(String(40), unique=True)
    event: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    # pending -> sending (claimed by one task) -> delivered | failed, or back to pending for a retry.
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    # When the next try is due (pending) or when a claim lapses (sending); NULL once finished.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set by the sweeper when it republishes, so it does not republish every pass.
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookAttempt(Base):
    """One POST of a delivery: what the receiver answered, or why it could not be reached."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column()
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    duration_ms: Mapped[int] = mapped_column(default=0)
    status_code: Mapped[int | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    # At most a small prefix of the receiver's answer, for debugging; never the whole body.
    response_prefix: Mapped[str | None] = mapped_column(String(256))
    next_retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
