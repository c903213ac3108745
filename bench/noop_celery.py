"""The Celery baseline: a raw Celery app whose one task does nothing but note when it ran.

    python -m celery -A bench.noop_celery worker --pool solo --queues bench-noop

It takes Kiln's own Celery settings (JSON, ``acks_late``, prefetch 1; ``app.settings.celery_config``)
so the only difference from a Kiln worker is what happens inside the task.
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache

import redis
from celery import Celery

from app.settings import Settings, celery_config

QUEUE = "bench-noop"
TASK = "bench.noop"
RAN_KEY = "bench:noop:ran"


def make_celery(redis_url: str) -> Celery:
    """A Celery app on ``redis_url`` with Kiln's settings, routing the no-op task to its own queue."""
    app = Celery("bench-noop")
    config = celery_config(Settings(database_url="sqlite://", redis_url=redis_url))
    config.update(task_default_queue=QUEUE, task_routes={TASK: {"queue": QUEUE}})
    app.config_from_object(config)
    return app


celery = make_celery(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


@lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


@celery.task(name=TASK)
def noop(sent_at: float) -> None:
    """Do nothing; push ``[sent_at, now]`` so the bench can read the round trip and the drain rate."""
    _redis().rpush(RAN_KEY, json.dumps([sent_at, time.time()]))
