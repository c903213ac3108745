"""The reaper and the reconciler: take back jobs whose worker vanished, republish lost wake-ups.

Both are safe to run concurrently (every change is a compare-and-set), but only the holder of
the ``reaper`` service lease acts, so logs and metrics tell one story.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.jobs import states
from app.jobs.attempts import end_attempt
from app.models import Job, ServiceLease, utcnow
from app.settings import Settings
from app.usage import Tally


@dataclass(frozen=True)
class Wakeup:
    """A queued job that needs a (new) broker message."""

    job_id: int
    kind: str
    token: int
    priority: str


def backoff_seconds(attempts: int) -> float:
    """Delay before attempt ``attempts + 1``: 2, 4, 8 ... seconds, at most 5 minutes."""
    return float(min(300, 2 ** max(1, attempts)))


def acquire_lease(*, session: Session, name: str, owner: str, seconds: float) -> bool:
    """Take or extend the named service lease; False while another owner holds it."""
    now = utcnow()
    expires = now + timedelta(seconds=seconds)
    result = session.execute(
        update(ServiceLease)
        .where(ServiceLease.name == name, or_(ServiceLease.owner == owner, ServiceLease.expires_at < now))
        .values(owner=owner, expires_at=expires)
    )
    if result.rowcount == 1:
        return True
    if session.get(ServiceLease, name) is not None:
        return False
    try:
        with session.begin_nested():
            session.add(ServiceLease(name=name, owner=owner, expires_at=expires))
    except IntegrityError:
        return False
    return True


def requeue_or_fail(
    *, session: Session, job: Job, error_class: str, message: str, now: datetime, retryable: bool = True,
    tally: Tally | None = None,
) -> str:
    """Return a running job to the queue (attempts left, with backoff) or fail it; returns the new state.

    The attempt's run time goes into ``tally`` when given (the caller applies it), else into the totals now."""
    token = job.attempts
    if job.cancel_requested_at is not None or job.pause_requested_at is not None:
        # The user asked this job to stop: honour that instead of retrying it.
        to = states.CANCELLED if job.cancel_requested_at is not None else states.PAUSED
        ok = states.transition(session, job.id, to=to, expect=states.RUNNING, token=token,
                               message=f"{message}; {to} as requested", data={"error_class": error_class})
        new_state = to
    elif retryable and job.attempts < job.max_attempts:
        ok = states.transition(
            session, job.id, to=states.QUEUED, expect=states.RUNNING, token=token,
            values={"not_before": now + timedelta(seconds=backoff_seconds(token)), "published_at": None},
            event="requeued", message=f"{message}; retrying (attempt {token + 1} of {job.max_attempts})",
            data={"error_class": error_class},
        )
        new_state = states.QUEUED
    else:
        ok = states.transition(
            session, job.id, to=states.FAILED, expect=states.RUNNING, token=token,
            values={"error_class": error_class, "error_message": message},
            message=message, data={"error_class": error_class},
        )
        new_state = states.FAILED
    if not ok:
        return job.state
    end_attempt(session=session, job_id=job.id, owner_id=job.owner_id, token=token, outcome=error_class, at=now,
                tally=tally)
    return new_state


def reap_expired(*, session: Session, now: datetime | None = None) -> list[tuple[int, str]]:
    """Take back running jobs whose lease expired: requeue them or fail them as ``worker_lost``."""
    now = now or utcnow()
    expired = session.execute(
        select(Job).where(Job.state == states.RUNNING, Job.lease_expires_at < now).order_by(Job.id)
    ).scalars().all()
    done = []
    tally = Tally()  # the run times, written after every job row: see Tally for the lock order
    for job in expired:
        message = f"worker {job.lease_owner or '?'} stopped renewing its lease (killed or unreachable)"
        done.append((job.id, requeue_or_fail(session=session, job=job, error_class="worker_lost", message=message,
                                             now=now, tally=tally)))
    tally.apply(session=session)
    return done


def due_wakeups(*, session: Session, settings: Settings, now: datetime | None = None) -> list[Wakeup]:
    """Queued jobs that have no recent broker message: never published, lost, or due after backoff."""
    now = now or utcnow()
    stale = now - timedelta(seconds=settings.requeue_after_seconds)
    rows = session.execute(
        select(Job.id, Job.kind, Job.attempts, Job.priority).where(
            Job.state == states.QUEUED,
            Job.cancel_requested_at.is_(None),
            or_(Job.not_before.is_(None), Job.not_before <= now),
            or_(Job.published_at.is_(None), Job.published_at < stale),
        ).order_by(Job.id).limit(500)
    ).all()
    return [Wakeup(job_id=r[0], kind=r[1], token=r[2], priority=r[3]) for r in rows]
