"""Usage totals: per user, the jobs submitted, the attempts started and the run time of the attempts that ended."""

from __future__ import annotations

from sqlalchemy import ForeignKey, SmallInteger, text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base


class UsageTotal(Base):
    """One user's running totals, kept by :mod:`app.usage` in the transaction that submits a job,
    claims an attempt or ends one, so the dashboard reads them instead of summing every attempt.

    An attempt that has not ended is not in ``cpu_seconds``/``gpu_seconds``: readers add its time so far.
    A user's totals are the sum of their rows, one per ``shard`` written (see :data:`app.usage.SHARDS`).
    """

    __tablename__ = "usage_totals"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True, default=0, server_default=text("0"))
    jobs: Mapped[int] = mapped_column(default=0)
    attempts: Mapped[int] = mapped_column(default=0)
    cpu_seconds: Mapped[float] = mapped_column(default=0.0)
    gpu_seconds: Mapped[float] = mapped_column(default=0.0)
