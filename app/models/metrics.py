"""Metrics streamed by a running attempt: one row per report (epoch, step or test)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, UTCDateTime, utcnow


class Metric(Base):
    """A set of named values measured at one point of training."""

    __tablename__ = "metrics"
    __table_args__ = (
        Index("ix_metrics_job_id_id", "job_id", "id"),
        Index("ix_metrics_job_id_scope_id", "job_id", "scope", "id"),  # one scope's curve, and its newest id
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column()
    scope: Mapped[str] = mapped_column(String(16))
    epoch: Mapped[int] = mapped_column()
    step: Mapped[int] = mapped_column()
    values: Mapped[dict[str, float]] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
