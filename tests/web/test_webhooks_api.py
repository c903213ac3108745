"""Webhook API: the signing secret (shown once, sealed at rest), spec validation and SSRF refusals at submit."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, update

from app import webhook_security
from app.db import session_scope
from app.models import Job, User, WebhookDelivery

TRAIN = {"kind": "train", "name": "hooked", "model": {"arch": "mlp", "hidden_sizes": [8]},
         "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 1}}


def _with_secret(client, auth) -> str:
    r = client.post("/api/v1/webhook-secret", headers=auth)
    assert r.status_code == 201, r.get_json()
    return r.get_json()["secret"]


def _jobs_of(settings, email_user_id: int) -> int:
    with session_scope(settings.database_url) as s:
        return s.execute(select(func.count(Job.id)).where(Job.owner_id == email_user_id)).scalar_one()


def test_secret_is_shown_once_sealed_at_rest_and_rotates(client, make_user, settings):
    user_id, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/webhook-secret", headers=auth).get_json() == {"prefix": None, "created_at": None}

    secret = _with_secret(client, auth)
    assert secret.startswith("whsec_") and len(secret) > 40
    shown = client.get("/api/v1/webhook-secret", headers=auth).get_json()
    assert shown["prefix"] == secret[:12] and "secret" not in shown and shown["created_at"]
    with session_scope(settings.database_url) as s:
        stored = s.get(User, user_id).webhook_secret
    assert secret not in stored and secret.removeprefix("whsec_") not in stored
    assert webhook_security.open_secret(settings, user_id=user_id, sealed=stored) == secret
    # Sealed for this user: the same ciphertext does not open as another user's secret.
    with pytest.raises(ValueError, match="rotate"):
        webhook_security.open_secret(settings, user_id=user_id + 1, sealed=stored)
    # ...nor under another KILN_SECRET_KEY.
    with pytest.raises(ValueError, match="KILN_SECRET_KEY"):
        webhook_security.open_secret(settings.with_overrides(secret_key="another-key"), user_id=user_id, sealed=stored)

    rotated = _with_secret(client, auth)
    assert rotated != secret
    assert client.get("/api/v1/webhook-secret", headers=auth).get_json()["prefix"] == rotated[:12]


@pytest.mark.parametrize("url", ["http://127.0.0.1/hook", "http://10.0.0.1/", "http://[::1]/",
                                 "http://169.254.169.254/latest/meta-data", "http://[::ffff:192.168.1.1]/",
                                 "https://0.0.0.0/"])
def test_private_destinations_are_refused_at_submit(client, make_user, settings, url):
    user_id, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    _with_secret(client, auth)
    r = client.post("/api/v1/jobs", json={**TRAIN, "webhook": {"url": url}}, headers=auth)
    assert r.status_code == 422, r.get_json()
    body = r.get_json()
    assert body["errors"][0]["field"] == "webhook.url", body
    assert "public addresses only" in body["errors"][0]["message"]
    assert _jobs_of(settings, user_id) == 0


def test_a_name_that_resolves_only_to_private_addresses_is_refused(client, make_user, settings, monkeypatch):
    monkeypatch.setattr(webhook_security, "system_resolver", lambda host, port: ["10.9.8.7", "192.168.0.2"])
    user_id, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    _with_secret(client, auth)
    r = client.post("/api/v1/jobs", json={**TRAIN, "webhook": {"url": "https://intranet.example.com/x"}},
                    headers=auth)
    assert r.status_code == 422
    assert r.get_json()["errors"][0]["field"] == "webhook.url"
    assert "10.9.8.7 is a private address" in r.get_json()["errors"][0]["message"]
    assert _jobs_of(settings, user_id) == 0


@pytest.mark.parametrize(("webhook", "field", "words"), [
    ({"url": "ftp://hooks.example.com/"}, "webhook.url", "http"),
    ({"url": "https://user:pw@hooks.example.com/"}, "webhook.url", "credentials"),
    ({"url": "https://hooks.example.com/" + "a" * 2001}, "webhook.url", "2000"),
    ({"url": "https://hooks.example.com/", "events": ["finished"]}, "webhook.events[0]", "running"),
    ({"url": "https://hooks.example.com/", "events": []}, "webhook.events", "at least 1"),
    ({"url": "https://hooks.example.com/", "events": ["failed", "failed"]}, "webhook.events", "twice"),
    ({"url": "https://hooks.example.com/", "secret": "x"}, "webhook.secret", "not permitted"),
])
def test_bad_webhook_specs_name_the_field(client, auth, webhook, field, words):
    r = client.post("/api/v1/jobs", json={**TRAIN, "webhook": webhook}, headers=auth)
    assert r.status_code == 422, r.get_json()
    errors = r.get_json()["errors"]
    assert errors[0]["field"] == field, errors
    assert words in errors[0]["message"], errors


def test_a_webhook_needs_a_secret_first_and_defaults_to_terminal_events(client, make_user, settings, monkeypatch):
    monkeypatch.setattr(webhook_security, "system_resolver", lambda host, port: ["93.184.215.14"])
    user_id, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    spec = {**TRAIN, "webhook": {"url": "https://hooks.example.invalid/kiln"}}
    r = client.post("/api/v1/jobs", json=spec, headers=auth)
    assert r.status_code == 422
    assert r.get_json()["errors"][0]["field"] == "webhook"
    assert "POST /api/v1/webhook-secret" in r.get_json()["errors"][0]["message"]

    _with_secret(client, auth)
    r = client.post("/api/v1/jobs", json=spec, headers=auth)
    assert r.status_code == 201, r.get_json()
    job = r.get_json()
    assert job["spec"]["webhook"] == {"url": "https://hooks.example.invalid/kiln",
                                      "events": ["succeeded", "failed", "cancelled"]}
    # Cancelling the queued job writes its outbox row in the cancel's transaction; the log shows it.
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=auth).status_code == 202
    items = client.get(f"/api/v1/jobs/{job['id']}/webhook-deliveries", headers=auth).get_json()["items"]
    assert [(i["event"], i["payload"]["type"], i["payload"]["data"]["job_id"]) for i in items] == [
        ("cancelled", "job.cancelled", job["id"])]
    # Another user's job's log answers 404 like a missing job.
    with session_scope(settings.database_url) as s:  # never handed to a worker by a later sweep
        s.execute(update(WebhookDelivery).where(WebhookDelivery.job_id == job["id"]).values(status="failed"))
    _, other = make_user()
    r = client.get(f"/api/v1/jobs/{job['id']}/webhook-deliveries", headers={"Authorization": f"Bearer {other}"})
    assert r.status_code == 404
