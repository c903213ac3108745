"""Idempotency keys for POSTs that create something: one answer per (user, key) for 24 hours.

:func:`claim` records a key before the request runs (the unique (user_id, key) constraint lets
only one of two concurrent requests through); :func:`complete` stores the answer, which a repeat
with the same key and the same request gets back instead of creating anything again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.jobs.errors import Conflict, KilnError
from app.models import IdempotencyKey, utcnow

TTL = timedelta(hours=24)
# A key whose request has not finished after this long is taken to be abandoned (a crashed process).
ABANDONED_AFTER = timedelta(minutes=5)
# How long a repeat waits for a concurrent request with the same key before answering 409.
WAIT_SECONDS = 10.0
MAX_KEY_LENGTH = 255


class KeyReused(KilnError):
    """The key was used before with another request."""


class KeyInProgress(Conflict):
    """A request with this key is still running."""


@dataclass(frozen=True)
class StoredAnswer:
    """The answer a key's first request got."""

    status: int
    body: bytes
    content_type: str | None
    location: str | None


def _existing(session: Session, user_id: int, key: str) -> IdempotencyKey | None:
    return session.execute(
        select(IdempotencyKey).where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key)
    ).scalar_one_or_none()


def claim(*, session: Session, user_id: int, key: str, fingerprint: str) -> StoredAnswer | None:
    """Record ``key`` for a request that is about to run (None), or the stored answer of its first run.

    Commits ``session``. Raises :class:`KeyReused` for another request under the same key and
    :class:`KeyInProgress` when the first request is still running after :data:`WAIT_SECONDS`.
    """
    now = utcnow()
    # Expired keys are purged on write: the table holds a day of keys at most.
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < now - TTL))
    session.commit()
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            session.add(IdempotencyKey(user_id=user_id, key=key, fingerprint=fingerprint, created_at=utcnow()))
            session.commit()
            return None
        except IntegrityError:
            session.rollback()
        row = _existing(session, user_id, key)
        if row is None:
            continue  # it expired and was purged meanwhile: claim it again
        if row.fingerprint != fingerprint:
            session.rollback()
            raise KeyReused(f"Idempotency-Key {key!r} was used with a different request")
        if row.status is not None:
            answer = StoredAnswer(row.status, row.body or b"", row.content_type, row.location)
            session.rollback()
            return answer
        if row.created_at < utcnow() - ABANDONED_AFTER:
            session.execute(update(IdempotencyKey).where(IdempotencyKey.id == row.id).values(created_at=utcnow()))
            session.commit()
            return None
        session.rollback()
        if time.monotonic() > deadline:
            raise KeyInProgress(f"a request with Idempotency-Key {key!r} is still in progress; retry shortly")
        time.sleep(0.2)


def complete(*, session: Session, user_id: int, key: str, answer: StoredAnswer | None) -> None:
    """Store the answer of a claimed key, or (None) release the key so the request may be retried. Commits."""
    stmt = (IdempotencyKey.user_id == user_id, IdempotencyKey.key == key)
    if answer is None:
        session.execute(delete(IdempotencyKey).where(*stmt))
    else:
        session.execute(update(IdempotencyKey).where(*stmt).values(
            status=answer.status, body=answer.body, content_type=answer.content_type, location=answer.location))
    session.commit()
