"""Webhooks end to end: a real worker POSTs signed events to a receiver on 127.0.0.1, retries, and the sweeper
publishes an outbox row whose message was lost."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import timedelta

import pytest

from app import reaper
from app.db import session_scope
from app.jobs import service
from app.jobs.schemas import parse_spec
from app.models import User, WebhookDelivery, utcnow
from tests.conftest import wait_for_job
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.integration

TRAIN = {"kind": "train", "name": "hooked", "model": {"arch": "mlp", "hidden_sizes": [16]},
         "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 2, "batch_size": 64}}


def verify(secret: str, headers: dict, body: bytes) -> bool:
    """The documented check (docs/api.md): HMAC-SHA256 over ``{id}.{timestamp}.{body}``, base64, ``v1,`` prefix."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, sig.split(",", 1)[1])
               for sig in headers["webhook-signature"].split() if sig.startswith("v1,"))


@pytest.fixture(scope="module")
def hooks_settings(settings):
    """The test settings with private destinations allowed (the receiver is on 127.0.0.1)."""
    return settings.with_overrides(webhook_allow_private=True)


@pytest.fixture(scope="module")
def hooks_client(hooks_settings):
    """An API client whose app allows 127.0.0.1 webhook URLs and publishes to the workers' Redis."""
    from app import create_app

    app = create_app({"TESTING": True, "DATABASE_URL": hooks_settings.database_url,
                      "REDIS_URL": hooks_settings.redis_url, "STORAGE_ROOT": hooks_settings.storage_root,
                      "WEBHOOK_ALLOW_PRIVATE": True})
    return app.test_client()


@pytest.fixture(scope="module")
def hook_workers(start_worker):
    """A training worker and a worker for the default queue, so deliveries never wait behind training."""
    return start_worker("train,predict"), start_worker("default")


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _user_with_secret(client, make_user) -> tuple[dict, str, int]:
    user_id, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    r = client.post("/api/v1/webhook-secret", headers=auth)
    assert r.status_code == 201
    return auth, r.get_json()["secret"], user_id


def test_running_and_succeeded_arrive_signed(hooks_client, make_user, hook_workers, receiver):
    auth, secret, _ = _user_with_secret(hooks_client, make_user)
    spec = {**TRAIN, "webhook": {"url": receiver.url, "events": ["running", "succeeded"]}}
    r = hooks_client.post("/api/v1/jobs", json=spec, headers=auth)
    assert r.status_code == 201, r.get_json()
    job = wait_for_job(hooks_client, auth, r.get_json()["id"], worker=hook_workers[0])
    assert job["state"] == "succeeded", job

    requests = receiver.wait_for(2)
    time.sleep(1.0)  # nothing more should come: the job wanted two events
    assert len(receiver.requests) == 2
    events = {json.loads(q["body"])["type"]: q for q in requests}
    assert set(events) == {"job.running", "job.succeeded"}
    for q in requests:
        assert q["path"] == "/hooks/kiln"
        assert q["headers"]["content-type"] == "application/json"
        assert verify(secret, q["headers"], q["body"]), q["headers"]
        # A changed body (or a wrong secret) fails the same check.
        assert not verify(secret, q["headers"], q["body"].replace(b'"job_id":', b'"job_id": '))
        assert not verify("whsec_" + base64.b64encode(b"x" * 32).decode(), q["headers"], q["body"])
        assert abs(int(q["headers"]["webhook-timestamp"]) - time.time()) < 600
    done = json.loads(events["job.succeeded"]["body"])["data"]
    assert (done["job_id"], done["state"], done["previous_state"], done["name"]) == (job["id"], "succeeded",
                                                                                     "running", "hooked")
    assert json.loads(events["job.running"]["body"])["data"]["attempt"] == 1

    log = hooks_client.get(f"/api/v1/jobs/{job['id']}/webhook-deliveries", headers=auth).get_json()["items"]
    assert sorted((d["event"], d["status"], [a["status_code"] for a in d["log"]]) for d in log) == [
        ("running", "delivered", [200]), ("succeeded", "delivered", [200])]
    assert {d["webhook_id"] for d in log} == {q["headers"]["webhook-id"] for q in requests}


def test_a_failing_receiver_gets_the_event_on_the_third_try(hooks_client, hooks_settings, make_user, hook_workers):
    receiver = Receiver(script=[500, 500])
    try:
        auth, secret, user_id = _user_with_secret(hooks_client, make_user)
        # A queued job that no worker is told about (not published), cancelled through the API: the
        # cancel's transaction writes the outbox row and the web publishes it after the commit.
        with session_scope(hooks_settings.database_url) as s:
            spec = parse_spec({**TRAIN, "webhook": {"url": receiver.url, "events": ["cancelled"]}})
            job_id = service.submit(session=s, owner=s.get(User, user_id), spec=spec, settings=hooks_settings).id
        assert hooks_client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth).status_code == 202

        requests = receiver.wait_for(3)
        assert [q["answered"] for q in requests] == [500, 500, 200]
        assert len({q["headers"]["webhook-id"] for q in requests}) == 1  # one event, retried
        assert all(verify(secret, q["headers"], q["body"]) for q in requests)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            (delivery,) = hooks_client.get(f"/api/v1/jobs/{job_id}/webhook-deliveries",
                                           headers=auth).get_json()["items"]
            if delivery["status"] == "delivered":
                break
            time.sleep(0.2)
        assert delivery["status"] == "delivered", delivery
        assert delivery["attempts"] == 3 and delivery["next_retry_at"] is None
        assert [(a["attempt"], a["status_code"]) for a in delivery["log"]] == [(1, 500), (2, 500), (3, 200)]
        assert [a["error"] for a in delivery["log"]] == ["HTTP 500", "HTTP 500", None]
        assert delivery["log"][0]["next_retry_at"] and delivery["log"][1]["next_retry_at"]
        assert delivery["log"][2]["next_retry_at"] is None
        assert delivery["log"][0]["response_prefix"] == "nope"
    finally:
        receiver.close()


def test_the_sweeper_publishes_a_delivery_whose_message_was_lost(hooks_settings, make_user, hook_workers, receiver):
    user_id, _ = make_user()
    with session_scope(hooks_settings.database_url) as s:
        from app import webhooks

        webhooks.rotate_secret(session=s, user=s.get(User, user_id), settings=hooks_settings)
        spec = parse_spec({**TRAIN, "webhook": {"url": receiver.url, "events": ["cancelled"]}})
        job = service.submit(session=s, owner=s.get(User, user_id), spec=spec, settings=hooks_settings)
        # The outbox row alone, as if the process died between its commit and the publish.
        overdue = utcnow() - timedelta(seconds=hooks_settings.requeue_after_seconds + 1)
        s.add(WebhookDelivery(job_id=job.id, message_id="msg_lost_publish_" + str(job.id), event="cancelled",
                              payload={"type": "job.cancelled", "data": {"job_id": job.id}}, status="pending",
                              attempts=0, next_attempt_at=overdue, created_at=overdue))
    time.sleep(2.0)
    assert receiver.requests == []  # nothing was published

    assert reaper.sweep_webhooks(hooks_settings)["webhooks_republished"] >= 1
    (request,) = receiver.wait_for(1)
    assert request["headers"]["webhook-id"] == f"msg_lost_publish_{job.id}"
    # Published once: the next pass leaves it alone (delivered, or recently published).
    assert reaper.sweep_webhooks(hooks_settings)["webhooks_republished"] == 0
