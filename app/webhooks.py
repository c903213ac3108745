"""Webhooks: the outbox rows job events write, the sweeper that publishes them, and one delivery attempt.

An event a job's webhook wants gets a ``webhook_deliveries`` row in the same transaction that
recorded the event (the state machine's transitions, a checkpoint's row), so no event is lost to
a crash between the commit and a publish. After the commit the ``kiln.webhook`` task is published
at once (an optimisation); the reaper's sweep publishes whatever is still due after that. The task
claims the row with a compare-and-set, POSTs outside any transaction, and records the attempt.
Signing, secrets and destination checks live in :mod:`app.webhook_security`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, event, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from app.models import Job, User, WebhookAttempt, WebhookDelivery, utcnow
from app.settings import Settings
from app.webhook_security import DestinationRefused, open_secret, pinned_request, resolve_checked, sign

log = logging.getLogger(__name__)

STATE_EVENTS = ("running", "succeeded", "failed", "cancelled")
_PENDING = "kiln_webhook_deliveries"
# ``session.info`` key: the settings whose broker a session's committed deliveries are published to.
PUBLISHER = "kiln_webhook_publisher"
RESPONSE_PREFIX = 256
# How long a claimed ("sending") row is held before another task may take it over.
CLAIM_MARGIN_SECONDS = 30.0
_publishers: dict[str, Settings] = {}


def _key(url: str) -> str:
    return make_url(url).render_as_string(hide_password=False)


def configure(settings: Settings) -> None:
    """Publish deliveries written through ``settings.database_url`` right after their commit."""
    _publishers[_key(settings.database_url)] = settings


def retry_delay(settings: Settings, attempt: int) -> float:
    """Seconds before try ``attempt + 1``: ``base * 3**(attempt - 1)``."""
    return settings.webhook_retry_base_seconds * 3 ** max(0, attempt - 1)


# --- secrets ----------------------------------------------------------------------------------


def rotate_secret(*, session: Session, user: User, settings: Settings) -> str:
    """Give ``user`` a new webhook signing secret (replacing any old one) and return it, once."""
    from app.webhook_security import new_secret, seal_secret

    secret = new_secret()
    user.webhook_secret = seal_secret(settings, user_id=user.id, secret=secret)
    user.webhook_secret_prefix = secret[:12]
    user.webhook_secret_created_at = utcnow()
    session.flush()
    return secret


# --- the outbox -------------------------------------------------------------------------------


def wants(webhook: dict[str, Any] | None, event_name: str) -> bool:
    """Whether a job's webhook (``jobs.webhook``) asked for ``event_name``."""
    return bool(webhook) and event_name in webhook.get("events", ())


def record(*, session: Session, job_id: int, event_name: str, data: dict[str, Any]) -> WebhookDelivery:
    """Write the outbox row for one event (the caller's transaction); it is published after the commit."""
    now = utcnow()
    payload = {"type": f"job.{event_name}", "timestamp": now.isoformat().replace("+00:00", "Z"),
               "data": {"job_id": job_id, **data}}
    row = WebhookDelivery(job_id=job_id, message_id=f"msg_{uuid.uuid4().hex}", event=event_name,
                          payload=payload, status="pending", attempts=0, next_attempt_at=now, created_at=now)
    session.add(row)
    session.flush()
    session.info.setdefault(_PENDING, []).append(row.id)
    return row


def record_transition(*, session: Session, job_id: int, webhook: dict[str, Any] | None, to: str,
                      from_state: str | None, attempt: int | None, message: str | None) -> None:
    """The outbox row for a state change, if the job's webhook wants it (called by ``states.transition``)."""
    if to not in STATE_EVENTS or not wants(webhook, to):
        return
    row = session.execute(
        select(Job.kind, Job.name, Job.progress, Job.epoch, Job.step, Job.error_class, Job.error_message)
        .where(Job.id == job_id)
    ).one()
    record(session=session, job_id=job_id, event_name=to, data={
        "kind": row.kind, "name": row.name, "state": to, "previous_state": from_state, "attempt": attempt,
        "progress": row.progress, "epoch": row.epoch, "step": row.step, "message": message,
        "error_class": row.error_class if to == "failed" else None,
        "error_message": row.error_message if to == "failed" else None,
    })


def record_checkpoint(*, session: Session, job_id: int, attempt: int, checkpoint_id: int, epoch: int,
                      step: int, reason: str, is_best: bool, job: Any = None) -> None:
    """The outbox row for a new checkpoint, if the job's webhook wants it.

    ``job``: the job's webhook, kind and name (attributes) read in this transaction already (the
    lease renewal returns them); else they are read here.
    """
    row = job if job is not None else session.execute(
        select(Job.webhook, Job.kind, Job.name).where(Job.id == job_id)).one()
    if not wants(row.webhook, "checkpoint"):
        return
    record(session=session, job_id=job_id, event_name="checkpoint", data={
        "kind": row.kind, "name": row.name, "state": "running", "attempt": attempt, "checkpoint_id": checkpoint_id,
        "epoch": epoch, "step": step, "reason": reason, "is_best": is_best,
    })


def record_progress(*, session: Session, settings: Settings, now: datetime | None = None) -> int:
    """Outbox rows for running jobs whose progress moved, at most one per job per progress interval.

    Driven by the reaper from the progress the worker already stores, so the training loop and its
    writes carry no webhook work; a crash loses nothing, since the next pass reads the same row.
    """
    now = now or utcnow()
    rows = session.execute(
        select(Job.id, Job.webhook, Job.kind, Job.name, Job.progress, Job.epoch, Job.step, Job.attempts)
        .where(Job.state == "running", Job.webhook.is_not(None)).order_by(Job.id).limit(1000)
    ).all()
    written = 0
    for job in rows:
        if not wants(job.webhook, "progress") or job.progress <= 0:
            continue
        last = session.execute(
            select(WebhookDelivery.created_at, WebhookDelivery.payload)
            .where(WebhookDelivery.job_id == job.id, WebhookDelivery.event == "progress")
            .order_by(WebhookDelivery.id.desc()).limit(1)
        ).one_or_none()
        if last is not None and (
            now - last.created_at < timedelta(seconds=settings.webhook_progress_interval_seconds)
            or last.payload.get("data", {}).get("progress") == job.progress
        ):
            continue
        record(session=session, job_id=job.id, event_name="progress", data={
            "kind": job.kind, "name": job.name, "state": "running", "attempt": job.attempts,
            "progress": job.progress, "epoch": job.epoch, "step": job.step,
        })
        written += 1
    return written


@event.listens_for(Session, "after_commit")
def _publish_after_commit(session: Session) -> None:
    ids = session.info.pop(_PENDING, None)
    if not ids:
        return
    settings = session.info.get(PUBLISHER)
    if settings is None:
        settings = _publishers.get(_key(session.get_bind().url.render_as_string(hide_password=False)))
    if settings is None:
        return  # no publisher in this process: the reaper's sweep publishes them
    from app.queue import publish_webhook

    for delivery_id in ids:
        publish_webhook(settings, delivery_id=delivery_id)


@event.listens_for(Session, "after_rollback")
def _forget_on_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)


def due(*, session: Session, settings: Settings, now: datetime | None = None, limit: int = 500) -> list[int]:
    """Deliveries whose message is overdue (never published, lost, or a lapsed claim); marks them published.

    A row is due at ``next_attempt_at``; its own message normally arrives then, so the sweep only
    takes rows overdue by ``requeue_after_seconds`` and not republished within that time.
    """
    now = now or utcnow()
    stale = now - timedelta(seconds=settings.requeue_after_seconds)
    ids = list(session.execute(
        select(WebhookDelivery.id).where(
            WebhookDelivery.status.in_(("pending", "sending")),
            WebhookDelivery.next_attempt_at <= stale,
            or_(WebhookDelivery.published_at.is_(None), WebhookDelivery.published_at <= stale),
        ).order_by(WebhookDelivery.id).limit(limit)
    ).scalars())
    if ids:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).values(published_at=now))
    return ids


# --- one delivery attempt --------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    """A claimed delivery: everything the POST needs, read in the claim's transaction."""

    delivery_id: int
    job_id: int
    message_id: str
    event: str
    attempt: int
    url: str
    body: bytes
    secret: str | None
    secret_error: str | None


@dataclass(frozen=True)
class Outcome:
    """What one POST achieved."""

    status_code: int | None
    error: str | None
    duration_ms: int
    response_prefix: str | None
    retryable: bool = True

    @property
    def ok(self) -> bool:
        """A 2xx answer."""
        return self.status_code is not None and 200 <= self.status_code < 300


def claim(*, session: Session, delivery_id: int, settings: Settings, now: datetime | None = None) -> Outgoing | None:
    """Take a due delivery for one attempt (compare-and-set), or None if it is not due or another task has it."""
    now = now or utcnow()
    claimable = and_(WebhookDelivery.status.in_(("pending", "sending")), WebhookDelivery.next_attempt_at <= now)
    result = session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, claimable).values(
            status="sending", attempts=WebhookDelivery.attempts + 1,
            next_attempt_at=now + timedelta(seconds=settings.webhook_timeout_seconds + CLAIM_MARGIN_SECONDS),
        ).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    row = session.execute(
        select(WebhookDelivery, Job.webhook, User.id, User.webhook_secret)
        .join(Job, Job.id == WebhookDelivery.job_id).join(User, User.id == Job.owner_id)
        .where(WebhookDelivery.id == delivery_id)
    ).one()
    delivery, webhook, user_id, sealed = row
    secret, secret_error = None, None
    try:
        secret = open_secret(settings, user_id=user_id, sealed=sealed)
    except ValueError as exc:
        secret_error = str(exc)
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
    return Outgoing(delivery_id=delivery.id, job_id=delivery.job_id, message_id=delivery.message_id,
                    event=delivery.event, attempt=delivery.attempts, url=(webhook or {}).get("url", ""),
                    body=body, secret=secret, secret_error=secret_error)


def send(outgoing: Outgoing, *, settings: Settings, resolver=None) -> Outcome:
    """POST one claimed delivery: resolve and check the host, connect to that address, read a prefix."""
    started = time.monotonic()

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    if outgoing.secret is None:
        return Outcome(None, outgoing.secret_error or "no webhook secret", elapsed(), None, retryable=False)
    try:
        address = resolve_checked(outgoing.url, allow_private=settings.webhook_allow_private, resolver=resolver)
    except DestinationRefused as exc:
        return Outcome(None, str(exc), elapsed(), None, retryable=exc.retryable)
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json", "user-agent": "Kiln-Webhooks/1",
        "webhook-id": outgoing.message_id, "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(outgoing.secret, outgoing.message_id, timestamp, outgoing.body),
    }
    try:
        status, prefix = pinned_request(outgoing.url, address, headers=headers, body=outgoing.body,
                                        timeout=settings.webhook_timeout_seconds, max_body=RESPONSE_PREFIX)
    except Exception as exc:  # noqa: BLE001 - any network failure is one failed attempt, retried
        return Outcome(None, f"{type(exc).__name__}: {exc}"[:500], elapsed(), None)
    error = None
    if 300 <= status < 400:
        error = f"HTTP {status}: redirects are not followed"
    elif not 200 <= status < 300:
        error = f"HTTP {status}"
    return Outcome(status, error, elapsed(), prefix)


def finish(*, session: Session, outgoing: Outgoing, outcome: Outcome, settings: Settings,
           now: datetime | None = None) -> datetime | None:
    """Log the attempt and settle the row: delivered, failed for good, or pending again; returns the retry time."""
    now = now or utcnow()
    retry_at = None
    if outcome.ok:
        values: dict[str, Any] = {"status": "delivered", "next_attempt_at": None, "finished_at": now}
    elif outcome.retryable and outgoing.attempt < settings.webhook_max_attempts:
        retry_at = now + timedelta(seconds=retry_delay(settings, outgoing.attempt))
        values = {"status": "pending", "next_attempt_at": retry_at, "published_at": None}
    else:
        values = {"status": "failed", "next_attempt_at": None, "finished_at": now}
    session.add(WebhookAttempt(
        delivery_id=outgoing.delivery_id, number=outgoing.attempt, at=now, duration_ms=outcome.duration_ms,
        status_code=outcome.status_code, error=outcome.error, response_prefix=outcome.response_prefix,
        next_retry_at=retry_at,
    ))
    # Only the claim this task holds settles the row (a lapsed claim taken over by another task does not).
    session.execute(update(WebhookDelivery).where(
        WebhookDelivery.id == outgoing.delivery_id, WebhookDelivery.status == "sending",
        WebhookDelivery.attempts == outgoing.attempt,
    ).values(**values).execution_options(synchronize_session=False))
    return retry_at


def deliver(delivery_id: int, *, settings: Settings, resolver=None) -> str:
    """One attempt at a delivery (the ``kiln.webhook`` task): claim, POST, record, schedule a retry."""
    from app.db import session_scope
    from app.queue import publish_webhook

    with session_scope(settings.database_url) as session:
        outgoing = claim(session=session, delivery_id=delivery_id, settings=settings)
    if outgoing is None:
        return "skipped"
    outcome = send(outgoing, settings=settings, resolver=resolver)
    with session_scope(settings.database_url) as session:
        retry_at = finish(session=session, outgoing=outgoing, outcome=outcome, settings=settings)
    log.info("event=webhook_attempt job_id=%s delivery_id=%s webhook_event=%s attempt=%s status_code=%s "
             "error=%r retry_at=%s", outgoing.job_id, delivery_id, outgoing.event, outgoing.attempt,
             outcome.status_code, outcome.error, retry_at.isoformat() if retry_at else None)
    if retry_at is not None:
        publish_webhook(settings, delivery_id=delivery_id,
                        countdown=max(0.0, (retry_at - utcnow()).total_seconds()))
        return "retrying"
    return "delivered" if outcome.ok else "failed"


def list_deliveries(*, session: Session, job_id: int, limit: int = 500) -> list[tuple[WebhookDelivery, list[WebhookAttempt]]]:
    """A job's deliveries, oldest first, each with its attempts (the caller checked who may see the job)."""
    deliveries = list(session.execute(
        select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id).limit(limit)
    ).scalars())
    attempts: dict[int, list[WebhookAttempt]] = {d.id: [] for d in deliveries}
    if deliveries:
        for a in session.execute(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(list(attempts)))
                                 .order_by(WebhookAttempt.delivery_id, WebhookAttempt.number)).scalars():
            attempts[a.delivery_id].append(a)
    return [(d, attempts[d.id]) for d in deliveries]
