"""Metrics streamed by a running attempt: one row per report (epoch, step or test), and each
metric's curve kept apart in packed chunks, so a poll draws a long series without reading its reports."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Index, LargeBinary, SmallInteger, String, Text
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


class MetricCurveChunk(Base):
    """Up to ``app.jobs.metric_curves.CHUNK_RECORDS`` consecutive records of one level of one metric's
    curve (a scope and a value name of a job's reports), packed as little-endian (id, epoch, step,
    value) records: level 0 holds every point, level 1 four records per block of points. Written by
    :mod:`app.jobs.metric_curves` in a fenced transaction of the attempt that stores reports (every
    few hundred reports, and its final one). ``total``: the curve's
    points when this chunk was written; ``covered_id``: every report of the job with an id up to it
    was in the curves then (a reader takes later reports from ``metrics``)."""

    __tablename__ = "metric_curve_chunks"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    chunk: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    count: Mapped[int] = mapped_column()
    total: Mapped[int] = mapped_column()
    covered_id: Mapped[int] = mapped_column()
    points: Mapped[bytes] = mapped_column(LargeBinary)
