"""app.webhooks without a worker: refusal at delivery time after DNS, the pinned connection, progress rate limits."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from app import webhook_security, webhooks
from app.db import session_scope
from app.jobs import attempts, service, states
from app.jobs.schemas import parse_spec
from app.models import Job, User, WebhookAttempt, WebhookDelivery
from tests.webhook_receiver import Receiver

TRAIN = {"kind": "train", "name": "hooked", "model": {"arch": "mlp", "hidden_sizes": [8]},
         "dataset": {"id": "builtin:digits"}}


def _job_with_webhook(settings, make_user, url: str, events: list[str]) -> int:
    user_id, _ = make_user()
    with session_scope(settings.database_url) as s:
        user = s.get(User, user_id)
        webhooks.rotate_secret(session=s, user=user, settings=settings)
        spec = parse_spec({**TRAIN, "webhook": {"url": url, "events": events}})
        return service.submit(session=s, owner=user, spec=spec,
                              settings=settings.with_overrides(webhook_allow_private=True)).id


def _pending_delivery(settings, job_id: int) -> int:
    with session_scope(settings.database_url) as s:
        delivery_id = webhooks.record(session=s, job_id=job_id, event_name="succeeded", data={"state": "succeeded"}).id
        s.info.clear()  # not published: these tests deliver in-process, and no worker may try these names
    return delivery_id


@pytest.fixture(autouse=True)
def _settle_outbox(settings):
    """Leave no pending delivery behind: a later sweep in the same run must not hand one to a worker."""
    yield
    with session_scope(settings.database_url) as s:
        # These jobs were never published; ended here, no later reconciler pass hands them to a worker.
        live = (states.QUEUED, states.RUNNING, states.PAUSED)
        for job_id in s.execute(select(Job.id).where(Job.webhook.is_not(None), Job.state.in_(live))).scalars():
            states.transition(s, job_id, to=states.CANCELLED, expect=live, message="test cleanup")
        s.execute(update(WebhookDelivery).where(WebhookDelivery.status.in_(("pending", "sending")))
                  .values(status="failed", next_attempt_at=None))
        s.info.clear()


def test_a_name_resolving_to_a_private_address_is_refused_at_delivery(settings, make_user, monkeypatch):
    # Accepted at submit (it resolved publicly then); at delivery it resolves to a private address.
    job_id = _job_with_webhook(settings, make_user, "https://hooks.example.invalid/kiln", ["succeeded"])
    delivery_id = _pending_delivery(settings, job_id)
    resolved = []

    def resolver(host, port):
        resolved.append((host, port))
        return ["10.20.30.40"]

    def no_traffic(*_args, **_kwargs):
        raise AssertionError("a refused destination must not be contacted")

    monkeypatch.setattr(webhook_security, "system_resolver", resolver)
    monkeypatch.setattr(webhooks, "pinned_request", no_traffic)
    assert webhooks.deliver(delivery_id, settings=settings) == "failed"
    assert resolved == [("hooks.example.invalid", 443)]
    with session_scope(settings.database_url) as s:
        delivery = s.get(WebhookDelivery, delivery_id)
        (attempt,) = s.execute(select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)).scalars()
        assert (delivery.status, delivery.attempts, attempt.status_code, attempt.next_retry_at) == ("failed", 1, None, None)
        assert "10.20.30.40 is a private address" in attempt.error
    # A later message for it (a duplicate) finds nothing to claim.
    assert webhooks.deliver(delivery_id, settings=settings) == "skipped"


def test_delivery_connects_to_the_checked_address_with_the_name_as_host(settings, make_user, monkeypatch):
    receiver = Receiver()
    try:
        url = f"http://hooks.example.test:{receiver.port}/in"
        job_id = _job_with_webhook(settings, make_user, url, ["succeeded"])
        delivery_id = _pending_delivery(settings, job_id)
        # The name resolves once, to the receiver's loopback address (allowed here, as in tests only).
        monkeypatch.setattr(webhook_security, "system_resolver", lambda host, port: ["127.0.0.1"])
        allowed = settings.with_overrides(webhook_allow_private=True)
        assert webhooks.deliver(delivery_id, settings=allowed) == "delivered"
        (request,) = receiver.wait_for(1)
        assert request["path"] == "/in"
        assert request["headers"]["host"] == f"hooks.example.test:{receiver.port}"
    finally:
        receiver.close()


def test_unresolvable_names_are_retried_and_literals_need_no_dns(settings, make_user, monkeypatch):
    job_id = _job_with_webhook(settings, make_user, "https://nowhere.example.invalid/", ["succeeded"])
    delivery_id = _pending_delivery(settings, job_id)

    def fails(host, port):
        raise OSError("Name or service not known")

    monkeypatch.setattr(webhook_security, "system_resolver", fails)
    published = []
    monkeypatch.setattr("app.queue.publish_webhook", lambda settings, **kw: published.append(kw) or True)
    assert webhooks.deliver(delivery_id, settings=settings) == "retrying"
    assert published and published[0]["delivery_id"] == delivery_id
    with session_scope(settings.database_url) as s:
        assert s.get(WebhookDelivery, delivery_id).status == "pending"
    with pytest.raises(webhook_security.DestinationRefused):
        webhook_security.resolve_checked("http://[fe80::1]/", allow_private=False, resolver=fails)
    assert webhook_security.resolve_checked("http://8.8.8.8/", allow_private=False, resolver=fails) == "8.8.8.8"


def test_progress_events_are_rate_limited_per_job(settings, make_user):
    job_id = _job_with_webhook(settings, make_user, "https://hooks.example.invalid/", ["progress"])
    with session_scope(settings.database_url) as s:
        attempt = attempts.claim(session=s, job_id=job_id, token=0, worker="w", host="h", pid=1, lease_seconds=60)
        owner = attempts.lease_owner(attempt)
    slow = settings.with_overrides(webhook_progress_interval_seconds=3600)

    def report(fraction: float) -> int:
        with session_scope(settings.database_url) as s:
            job = attempts.renew(session=s, job_id=job_id, token=1, owner=owner, lease_seconds=60)
            job.progress = fraction
        with session_scope(settings.database_url) as s:
            written = webhooks.record_progress(session=s, settings=slow)
            s.info.clear()  # not published here: this test reads the outbox only
        return written

    assert report(0.25) >= 1
    assert report(0.5) == 0  # within the interval: no second progress event for this job
    with session_scope(settings.database_url) as s:
        rows = s.execute(select(WebhookDelivery.payload).where(
            WebhookDelivery.job_id == job_id, WebhookDelivery.event == "progress")).scalars().all()
    assert [r["data"]["progress"] for r in rows] == [0.25]
