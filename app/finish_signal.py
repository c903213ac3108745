"""The finish signal: a worker says on Redis that a job's attempt ended; an inline request waits for it.

The worker pushes onto ``kiln:done:<job_id>`` after the finishing transaction committed, with a
short expiry, so a waiter that starts late still finds it; the web waits with a blocking ``BLPOP``
on a connection from its process's pool, holding no database connection meanwhile. The signal is a
wake-up, never state: the waiter reads the job's row once it wakes (or its time is up).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import redis

from app.settings import Settings

log = logging.getLogger(__name__)

KEY = "kiln:done:{job_id}"
# Long enough for a waiter that subscribes after the finish; short enough to leave nothing behind.
EXPIRE_SECONDS = 120


@lru_cache(maxsize=8)
def _pool(url: str, pid: int) -> redis.ConnectionPool:
    # Keyed by pid too: a forked child (gunicorn, prefork) must not share its parent's sockets.
    return redis.ConnectionPool.from_url(url, socket_connect_timeout=3, health_check_interval=30)


def _client(settings: Settings) -> redis.Redis:
    return redis.Redis(connection_pool=_pool(settings.redis_url, os.getpid()))


def notify_finished(settings: Settings, *job_ids: int) -> None:
    """Wake whoever waits on each of ``job_ids`` (call after the finishing transaction committed), in
    one round trip; never raises."""
    if not job_ids:
        return
    try:
        with _client(settings).pipeline(transaction=True) as pipe:
            for job_id in job_ids:
                key = KEY.format(job_id=job_id)
                pipe.lpush(key, 1).expire(key, EXPIRE_SECONDS)
            pipe.execute()
    except redis.RedisError as exc:  # a waiter then answers 202 at its deadline: nothing is lost
        log.warning("event=finish_signal_failed job_ids=%s error=%r", list(job_ids), exc)


def wait_finished(settings: Settings, job_id: int, timeout: float) -> bool:
    """Block up to ``timeout`` seconds for ``job_id``'s finish signal; True if it came."""
    if timeout <= 0:
        return False
    try:
        # BLPOP's timeout has millisecond resolution; 0 would mean "forever".
        return _client(settings).blpop([KEY.format(job_id=job_id)], timeout=max(timeout, 0.01)) is not None
    except redis.RedisError as exc:
        log.warning("event=finish_wait_failed job_id=%s error=%r", job_id, exc)
        return False
