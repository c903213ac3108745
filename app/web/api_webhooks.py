"""API routes for webhooks, registered on the ``/api/v1`` blueprint: the signing secret and a job's delivery log."""

from __future__ import annotations

from typing import Any

from flask import jsonify

from app import webhooks
from app.jobs import service
from app.models import User, WebhookAttempt, WebhookDelivery
from app.web.api import api
from app.web.auth import current_user
from app.web.context import db, settings
from app.web.serializers import iso


def secret_json(user: User) -> dict[str, Any]:
    """The caller's webhook secret as the API shows it again: its prefix, never the secret."""
    return {"prefix": user.webhook_secret_prefix, "created_at": iso(user.webhook_secret_created_at)}


def delivery_json(delivery: WebhookDelivery, attempts: list[WebhookAttempt]) -> dict[str, Any]:
    """One delivery with its attempts, oldest first."""
    return {
        "id": delivery.id, "webhook_id": delivery.message_id, "event": delivery.event, "status": delivery.status,
        "attempts": delivery.attempts, "created_at": iso(delivery.created_at),
        "next_retry_at": iso(delivery.next_attempt_at) if delivery.status == "pending" else None,
        "finished_at": iso(delivery.finished_at), "payload": delivery.payload,
        "log": [{"attempt": a.number, "at": iso(a.at), "status_code": a.status_code, "error": a.error,
                 "duration_ms": a.duration_ms, "response_prefix": a.response_prefix,
                 "next_retry_at": iso(a.next_retry_at)} for a in attempts],
    }


@api.get("/webhook-secret")
def get_webhook_secret():
    """The prefix and creation time of the caller's webhook signing secret (nulls when none exists)."""
    return jsonify(secret_json(current_user()))


@api.post("/webhook-secret")
def rotate_webhook_secret():
    """Create or replace the caller's signing secret; the answer's ``secret`` is the only time it is shown."""
    user = current_user()
    secret = webhooks.rotate_secret(session=db(), user=user, settings=settings())
    body = secret_json(user) | {"secret": secret}
    db().commit()
    return jsonify(body), 201


@api.get("/jobs/<int:job_id>/webhook-deliveries")
def job_webhook_deliveries(job_id: int):
    """The job's webhook deliveries and each attempt: status code, error, duration, next retry."""
    service.get_job(session=db(), user=current_user(), job_id=job_id)
    return jsonify(items=[delivery_json(d, a) for d, a in webhooks.list_deliveries(session=db(), job_id=job_id)])
