"""Usage totals: per user, the jobs submitted, the attempts started and the run time of the attempts that ended."""

from __future__ import annotations

from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base


class UsageTotal(Base):
    """One user's running totals, kept by :mod:`app.usage` in the transaction that submits a job,
    claims an attempt or ends one, so the dashboard reads them instead of summing every attempt.

    An attempt that has not ended is not in ``cpu_seconds``/``gpu_seconds``: readers add its time so far.
    """

    __tablename__ = "usage_totals"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    jobs: Mapped[int] = mapped_column(default=0)
    attempts: Mapped[int] = mapped_column(default=0)
    cpu_seconds: Mapped[float] = mapped_column(default=0.0)
    gpu_seconds: Mapped[float] = mapped_column(default=0.0)
