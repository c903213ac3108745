"""A job's log: its events rendered as log lines (time, level, attempt, message).

Workers write JSON log lines to their own stdout, which the web tier cannot read; the events
table holds every state change and notable moment of every attempt, so it is the job's log here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs import service
from app.jobs.states import TERMINAL
from app.models import Job, JobEvent, User

# Events that say something went wrong; everything else is an ordinary INFO line.
ERROR_KINDS = frozenset({"failed", "traceback"})
WARNING_KINDS = frozenset({"write_refused", "checkpoint_skipped", "requeued", "reaped", "worker_lost"})


@dataclass(frozen=True)
class LogLine:
    """One line of a job's log, with the event id it came from (the cursor of a follow)."""

    id: int
    at: datetime
    level: str
    attempt: int | None
    kind: str
    message: str

    def text(self) -> str:
        """``2025-01-31T12:00:00.123456+00:00 INFO attempt=2 resumed: resumed from epoch 3``."""
        attempt = f"attempt={self.attempt}" if self.attempt is not None else "attempt=-"
        return f"{self.at.isoformat()} {self.level} {attempt} {self.kind}: {self.message}"


def _level(event: JobEvent) -> str:
    if event.kind in ERROR_KINDS or event.to_state == "failed":
        return "ERROR"
    return "WARNING" if event.kind in WARNING_KINDS else "INFO"


def _line(event: JobEvent) -> LogLine:
    message = event.message or (f"{event.from_state or '-'} -> {event.to_state}" if event.to_state else "")
    return LogLine(id=event.id, at=event.at, level=_level(event), attempt=event.attempt, kind=event.kind,
                   message=message)


def _events(user: User):
    stmt = select(JobEvent)
    # Tracebacks may name paths and hosts: admins only, as in the events list.
    return stmt if user.is_admin else stmt.where(JobEvent.kind != "traceback")


def tail(*, session: Session, user: User, job_id: int, lines: int | None = None) -> list[LogLine]:
    """The job's log, oldest first; ``lines`` keeps only the last N. NotFound like ``get_job``."""
    service.get_job(session=session, user=user, job_id=job_id)
    stmt = _events(user).where(JobEvent.job_id == job_id)
    if lines is not None:
        newest = list(session.execute(stmt.order_by(JobEvent.id.desc()).limit(lines)).scalars())
        return [_line(e) for e in reversed(newest)]
    return [_line(e) for e in session.execute(stmt.order_by(JobEvent.id)).scalars()]


def since(*, session: Session, user: User, job_id: int, after_id: int) -> tuple[list[LogLine], bool]:
    """Lines after event ``after_id``, and whether the job has ended (a follow stops then)."""
    state = session.execute(select(Job.state).where(Job.id == job_id)).scalar_one_or_none()
    stmt = _events(user).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id)
    lines = [_line(e) for e in session.execute(stmt).scalars()]
    return lines, state is None or state in TERMINAL
