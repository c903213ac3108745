"""Attempts record where they really started: nothing until they load a checkpoint, then its position."""

from __future__ import annotations

from datetime import timedelta

from app.accounts import create_user
from app.jobs import attempts, recovery
from app.models import Attempt, Job, utcnow
from app.web import serializers

LEASE = 30


def _claim(session, job: Job) -> Attempt:
    attempt = attempts.claim(session=session, job_id=job.id, token=job.attempts, worker="w", host="h", pid=1,
                             lease_seconds=LEASE)
    assert attempt is not None
    session.refresh(job)
    # A claim returns what it wrote (no ORM instance); the test follows the attempt's row.
    return session.query(Attempt).filter_by(job_id=attempt.job_id, number=attempt.number).one()


def _lose(session, job: Job) -> None:
    """The worker dies: its lease expires, the reaper requeues the job, and the backoff is over."""
    assert recovery.reap_expired(session=session, now=utcnow() + timedelta(seconds=LEASE + 1)) == [(job.id, "queued")]
    session.refresh(job)
    job.not_before = None
    session.flush()


def test_an_attempt_lost_before_it_loaded_a_checkpoint_claims_no_start_position(session):
    user, _ = create_user(session=session, email="attempt-start@example.com")
    job = Job(owner_id=user.id, kind="train", name="j", state="queued", queue="train", spec={}, max_attempts=5)
    session.add(job)
    session.flush()

    first = _claim(session, job)
    assert first.start_epoch is None and first.start_step is None  # not started yet
    attempts.mark_start(session=session, job_id=job.id, token=1, owner=attempts.lease_owner(first),
                        lease_seconds=LEASE, epoch=0, step=0, resumed=False)
    attempts.add_checkpoint(session=session, job_id=job.id, token=1, owner=attempts.lease_owner(first),
                            lease_seconds=LEASE, epoch=2, step=20, path="jobs/x/e2.safetensors", size=1,
                            sha256="0" * 64, metric_name=None, metric_value=None, is_best=True, reason="periodic")
    # It got into epoch 3 before dying, past its newest checkpoint (epoch 2).
    attempts.record_metrics(session=session, job_id=job.id, token=1, owner=attempts.lease_owner(first),
                            lease_seconds=LEASE, scope="epoch", epoch=3, step=30, values={"train_loss": 0.5})
    _lose(session, job)
    assert job.epoch == 3

    second = _claim(session, job)  # dies before it has read any checkpoint
    _lose(session, job)
    session.refresh(second)
    assert second.start_epoch is None and second.start_step is None
    assert serializers.attempt(second)["start_epoch"] is None

    third = _claim(session, job)
    attempts.mark_start(session=session, job_id=job.id, token=3, owner=attempts.lease_owner(third),
                        lease_seconds=LEASE, epoch=2, step=20, resumed=True)
    session.refresh(third)
    session.refresh(first)
    assert (first.start_epoch, first.start_step) == (0, 0)
    assert (third.start_epoch, third.start_step) == (2, 20)
    assert serializers.attempt(third)["start_epoch"] == 2
    assert job.resumed_from_epoch == 2
