"""Task names and publishing by name: the web enqueues with ``send_task`` and never imports ``worker``.

A message carries only the job id and the fencing token the claim must see; the database row
holds the state. Publishing happens after the job's row is committed.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.settings import Settings

TRAIN_TASK = "kiln.train"
PREDICT_TASK = "kiln.predict"
WEBHOOK_TASK = "kiln.webhook"
TASK_FOR_KIND = {"train": TRAIN_TASK, "predict": PREDICT_TASK}
# Redis priorities run the other way from AMQP: 0 is served first. Kombu keeps one list per step
# (0, 3, 6, 9) and pops them in that order.
PRIORITY = {"high": 0, "normal": 3, "low": 6}

log = logging.getLogger(__name__)


@lru_cache(maxsize=8)
def client(settings: "Settings"):
    """A Celery client (publisher only) configured from ``settings``."""
    from celery import Celery

    from app.settings import celery_config

    client = Celery("kiln-publisher")
    client.config_from_object(celery_config(settings))
    return client


def publish(settings: "Settings", *, job_id: int, kind: str, token: int, priority: str = "normal") -> bool:
    """Send the wake-up message for a queued job; False (logged) if the broker is unreachable."""
    try:
        client(settings).send_task(
            TASK_FOR_KIND[kind],
            args=[job_id, token],
            priority=PRIORITY.get(priority, PRIORITY["normal"]),
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        )
    except Exception as exc:  # noqa: BLE001 - any broker failure leaves the job queued for the reconciler
        log.warning("event=publish_failed job_id=%s error=%r", job_id, exc)
        return False
    log.info("event=published job_id=%s kind=%s token=%s", job_id, kind, token)
    return True


def publish_webhook(settings: "Settings", *, delivery_id: int, countdown: float | None = None) -> bool:
    """Send the wake-up for one webhook delivery (after its row is committed); False (logged) on failure."""
    try:
        client(settings).send_task(
            WEBHOOK_TASK, args=[delivery_id], countdown=countdown or None,
            retry=True, retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        )
    except Exception as exc:  # noqa: BLE001 - the row stays pending; the reaper's sweep republishes it
        log.warning("event=webhook_publish_failed delivery_id=%s error=%r", delivery_id, exc)
        return False
    return True
