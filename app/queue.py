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
import threading
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
    The builder runs once per task name, priority and thread (its ``reply_to`` is per thread):
    each message fills that template's ids and arguments.
    """
    key, template, body_rest = _template(settings, name, priority)
    task_id = str(uuid.uuid4())
    body = base64.b64encode(("[" + json_dumps(args) + body_rest).encode()).decode()
    payload = (template.replace(_TASK_ID, task_id).replace(_DELIVERY_TAG, str(uuid.uuid4()))
               .replace(_ARGSREPR, repr(args)).replace(_BODY, body))
    return key, payload


# Placeholders of a message template: JSON-safe strings no real value contains.
_TASK_ID, _DELIVERY_TAG, _ARGSREPR, _BODY = ("@kiln-task-id@", "@kiln-delivery-tag@", "@kiln-argsrepr@",
                                             "@kiln-body@")
_templates = threading.local()


def _template(settings: "Settings", name: str, priority: int) -> tuple[str, str, str]:
    """(list, payload with placeholders, the body after its arguments) for this thread's messages."""
    cache = _templates.__dict__.setdefault("by_key", {})
    found = cache.get((settings, name, priority, os.getpid()))
    if found is not None:
        return found
    celery = client(settings)
    # The reprs a plain list of ids needs no saferepr for (Celery's default walks it object by object).
    headers, properties, body, _ = celery.amqp.create_task_message(
        _TASK_ID, name, [], {}, reply_to=celery.thread_oid, ignore_result=None, argsrepr=_ARGSREPR,
        kwargsrepr="{}")
    content_type, content_encoding, data = serialize(body, serializer="json")
    if not data.startswith("[[]"):
        raise RuntimeError(f"unexpected Celery message body {data[:40]!r}")
    queue = celery.conf.task_routes[name]["queue"]
    properties.update(
        delivery_mode=2, delivery_info={"exchange": "", "routing_key": queue}, priority=priority,
        body_encoding="base64", delivery_tag=_DELIVERY_TAG,
    )
    message = {"body": _BODY, "content-encoding": content_encoding,
               "content-type": content_type, "headers": headers, "properties": properties}
    step = max(s for s in REDIS_PRIORITY_STEPS if s <= priority)
    found = ((f"{queue}{REDIS_PRIORITY_SEPARATOR}{step}" if step else queue), json_dumps(message), data[3:])
    cache[(settings, name, priority, os.getpid())] = found
    return found


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
