"""Reaper and reconciler on a real database: expired leases, backoff, lost wake-ups, one acting instance."""

from __future__ import annotations

from datetime import timedelta

from app.accounts import create_user
from app.jobs import attempts, recovery, states
from app.models import Attempt, Job, utcnow


def _job(session, **values) -> Job:
    user, _ = create_user(session=session, email=f"r{id(values)}-{utcnow().timestamp()}@example.com")
    job = Job(owner_id=user.id, kind="train", name="j", state="queued", queue="train", spec={}, **values)
    session.add(job)
    session.flush()
    return job


def _claimed(session, **values) -> Job:
    job = _job(session, **values)
    assert attempts.claim(session=session, job_id=job.id, token=0, worker="w", host="h", pid=1, lease_seconds=30)
    session.refresh(job)
    return job


def test_expired_lease_is_requeued_with_backoff_and_the_attempt_ends(session, settings):
    job = _claimed(session, max_attempts=3)
    now = utcnow() + timedelta(seconds=31)
    assert recovery.reap_expired(session=session, now=now) == [(job.id, "queued")]
    session.refresh(job)
    assert job.state == "queued" and job.not_before == now + timedelta(seconds=2) and job.published_at is None
    attempt = session.query(Attempt).filter_by(job_id=job.id).one()
    assert attempt.outcome == "worker_lost" and attempt.ended_at == now
    # Not published before its backoff is over, then published once due.
    assert job.id not in [w.job_id for w in recovery.due_wakeups(session=session, settings=settings, now=now)]
    later = now + timedelta(seconds=3)
    assert job.id in [w.job_id for w in recovery.due_wakeups(session=session, settings=settings, now=later)]


def test_lease_not_yet_expired_is_left_alone(session):
    job = _claimed(session)
    assert job.id not in [j for j, _ in recovery.reap_expired(session=session, now=utcnow() + timedelta(seconds=5))]


def test_last_attempt_lost_fails_as_worker_lost(session):
    job = _claimed(session, max_attempts=1)
    recovery.reap_expired(session=session, now=utcnow() + timedelta(seconds=31))
    session.refresh(job)
    assert job.state == "failed" and job.error_class == "worker_lost"
    assert "stopped renewing its lease" in job.error_message


def test_lost_job_with_a_cancel_request_ends_cancelled_not_requeued(session):
    job = _claimed(session)
    job.cancel_requested_at = utcnow()
    session.flush()
    recovery.reap_expired(session=session, now=utcnow() + timedelta(seconds=31))
    session.refresh(job)
    assert job.state == states.CANCELLED


def test_stale_attempt_cannot_renew_or_write_after_reaping(session):
    import pytest

    from app.jobs.errors import StaleAttempt

    job = _claimed(session)
    owner = job.lease_owner
    recovery.reap_expired(session=session, now=utcnow() + timedelta(seconds=31))
    with pytest.raises(StaleAttempt):
        attempts.renew(session=session, job_id=job.id, token=1, owner=owner, lease_seconds=30)
    with pytest.raises(StaleAttempt):
        attempts.record_metrics(session=session, job_id=job.id, token=1, owner=owner, lease_seconds=30,
                                scope="epoch", epoch=1, step=1, values={"train_loss": 1.0})


def test_published_recently_is_not_republished_until_stale(session, settings):
    job = _job(session, published_at=utcnow())
    now = utcnow()
    assert job.id not in [w.job_id for w in recovery.due_wakeups(session=session, settings=settings, now=now)]
    stale = now + timedelta(seconds=settings.requeue_after_seconds + 1)
    assert job.id in [w.job_id for w in recovery.due_wakeups(session=session, settings=settings, now=stale)]


def test_only_one_reaper_holds_the_lease(session):
    name = f"reaper-{utcnow().timestamp()}"
    assert recovery.acquire_lease(session=session, name=name, owner="a", seconds=10)
    assert not recovery.acquire_lease(session=session, name=name, owner="b", seconds=10)
    assert recovery.acquire_lease(session=session, name=name, owner="a", seconds=10)  # renewal
    from app.models import ServiceLease

    session.get(ServiceLease, name).expires_at = utcnow() - timedelta(seconds=1)
    session.flush()
    assert recovery.acquire_lease(session=session, name=name, owner="b", seconds=10)


def test_duplicate_claims_yield_one_attempt(session):
    job = _job(session)
    first = attempts.claim(session=session, job_id=job.id, token=0, worker="a", host="h", pid=1, lease_seconds=30)
    second = attempts.claim(session=session, job_id=job.id, token=0, worker="b", host="h", pid=2, lease_seconds=30)
    assert first is not None and second is None
    assert session.query(Attempt).filter_by(job_id=job.id).count() == 1


def test_a_requeued_job_with_a_stop_request_is_not_run_again(session):
    cancelled = _job(session, cancel_requested_at=utcnow())
    paused = _job(session, pause_requested_at=utcnow())
    for job in (cancelled, paused):
        assert attempts.claim(session=session, job_id=job.id, token=0, worker="w", host="h", pid=1,
                              lease_seconds=30) is None
        session.refresh(job)
    assert (cancelled.state, paused.state) == ("cancelled", "paused")
    assert cancelled.attempts == paused.attempts == 0
