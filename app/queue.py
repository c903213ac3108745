"""Task names and publishing by name: the web enqueues Celery messages and never imports ``worker``.

A message carries only the job id and the fencing token the claim must see; the database row
holds the state. Publishing happens after the job's row is committed.

A job's wake-up message is the message Celery's ``send_task`` would send (protocol 2 headers and
body from Celery's own builder, in kombu's Redis envelope), pushed with one LPUSH on a pooled
connection: the same bytes real workers consume, without kombu's per-publish producer, channel
and client set-up (tests/test_queue.py holds the two side by side).
"""

from __future__ import annotations

import base64
import logging
import os
import uuid
from functools import lru_cache
from typing import TYPE_CHECKING

import redis
from kombu.serialization import dumps as serialize
from kombu.utils.json import dumps as json_dumps
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

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


@lru_cache(maxsize=8)
def _broker(url: str, pid: int) -> redis.Redis:
    # Keyed by pid too: a forked child (gunicorn, prefork) must not share its parent's sockets.
    # Two retries with backoff on a dropped connection, as kombu's publish retry policy did.
    return redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3, health_check_interval=30,
                                retry=Retry(ExponentialBackoff(cap=0.3, base=0.1), 2))


def task_message(settings: "Settings", name: str, args: list, priority: int) -> tuple[str, str]:
    """The Redis list and the payload kombu would LPUSH for ``send_task(name, args, priority=...)``.

    Headers, properties and body come from Celery's protocol builder (``create_task_message``);
    the envelope is kombu's virtual transport's (JSON body, base64-encoded, persistent delivery,
    a fresh delivery tag), and the list is kombu's Redis list for the queue and priority step.
    """
    celery = client(settings)
    task_id = str(uuid.uuid4())
    # The reprs a plain list of ids needs no saferepr for (Celery's default walks it object by object).
    headers, properties, body, _ = celery.amqp.create_task_message(
        task_id, name, args, {}, reply_to=celery.thread_oid, ignore_result=None, argsrepr=repr(args), kwargsrepr="{}")
    content_type, content_encoding, data = serialize(body, serializer="json")
    queue = celery.conf.task_routes[name]["queue"]
    properties.update(
        delivery_mode=2, delivery_info={"exchange": "", "routing_key": queue}, priority=priority,
        body_encoding="base64", delivery_tag=str(uuid.uuid4()),
    )
    message = {"body": base64.b64encode(data.encode()).decode(), "content-encoding": content_encoding,
               "content-type": content_type, "headers": headers, "properties": properties}
    step = max(s for s in REDIS_PRIORITY_STEPS if s <= priority)
    return (f"{queue}{REDIS_PRIORITY_SEPARATOR}{step}" if step else queue), json_dumps(message)


# kombu's Redis transport keeps one list per priority step, named "<queue>\x06\x16<step>" (0: "<queue>").
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
REDIS_PRIORITY_SEPARATOR = "\x06\x16"


def publish(settings: "Settings", *, job_id: int, kind: str, token: int, priority: str = "normal") -> bool:
    """Send the wake-up message for a queued job; False (logged) if the broker is unreachable."""
    try:
        key, payload = task_message(settings, TASK_FOR_KIND[kind], [job_id, token],
                                    PRIORITY.get(priority, PRIORITY["normal"]))
        _broker(settings.redis_url, os.getpid()).lpush(key, payload)
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
