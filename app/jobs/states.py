"""The job state machine: the table of allowed transitions and the only writer of ``Job.state``.

Every transition is one conditional UPDATE (compare-and-set on the current state and, where
given, the fencing token), so two writers can never both win; each records a ``JobEvent``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app import webhooks
from app.models import Job, JobEvent, utcnow

QUEUED = "queued"
RUNNING = "running"
PAUSED = "paused"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

STATES = (QUEUED, RUNNING, PAUSED, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED, PAUSED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, QUEUED, PAUSED}),
    PAUSED: frozenset({QUEUED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset({QUEUED}),
    CANCELLED: frozenset({QUEUED}),
}


class InvalidTransition(ValueError):
    """A transition the table does not allow."""


def allowed(from_state: str, to_state: str) -> bool:
    """Whether the table allows ``from_state -> to_state``."""
    return to_state in TRANSITIONS.get(from_state, frozenset())


def transition(
    session: Session,
    job_id: int,
    *,
    to: str,
    expect: str | tuple[str, ...],
    token: int | None = None,
    values: dict[str, Any] | None = None,
    event: str = "state",
    message: str | None = None,
    data: dict[str, Any] | None = None,
) -> bool:
    """Move a job to ``to`` if it is in ``expect`` (and holds ``token``); False if another won.

    ``values`` are extra column updates applied in the same statement (SQL expressions allowed).
    The caller owns the transaction.
    """
    expected = (expect,) if isinstance(expect, str) else tuple(expect)
    now = utcnow()
    changes: dict[str, Any] = {"state": to, "updated_at": now}
    if to in TERMINAL:
        changes.update(finished_at=now, lease_owner=None, lease_expires_at=None)
    elif to == QUEUED:
        changes.update(queued_at=now, lease_owner=None, lease_expires_at=None, finished_at=None)
    elif to == PAUSED:
        changes.update(lease_owner=None, lease_expires_at=None)
    changes.update(values or {})
    # The conditional UPDATE is the only guard, with no read before it: whatever a writer saw
    # earlier, only one UPDATE can match the row in a given state (and with the fencing token).
    # One statement per allowed source state, so the event knows which state the job left.
    for current in (s for s in expected if allowed(s, to)):
        stmt = update(Job).where(Job.id == job_id, Job.state == current)
        if token is not None:
            stmt = stmt.where(Job.attempts == token)
        result = session.execute(stmt.values(**changes).execution_options(synchronize_session=False))
        if result.rowcount == 1:
            break
    else:
        current = session.execute(select(Job.state).where(Job.id == job_id)).scalar_one_or_none()
        if current in expected and not allowed(current, to):
            raise InvalidTransition(f"{current} -> {to} is not a job transition")
        return False
    attempt, webhook = session.execute(select(Job.attempts, Job.webhook).where(Job.id == job_id)).one()
    session.add(
        JobEvent(
            job_id=job_id, at=now, kind=event, from_state=current, to_state=to,
            attempt=attempt or None, message=message, data=data,
        )
    )
    # The outbox row, in this transaction: committed with the event or not at all.
    webhooks.record_transition(session=session, job_id=job_id, webhook=webhook, to=to, from_state=current,
                               attempt=attempt or None, message=message)
    session.flush()
    return True
