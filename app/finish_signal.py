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


# Seconds a blocking wait's socket read may take beyond the wait itself before the connection is
# given up (a Redis that vanished without closing it).
READ_MARGIN_SECONDS = 5.0


@lru_cache(maxsize=8)
def _client(url: str, pid: int, read_timeout: float | None) -> redis.Redis:
    # Keyed by pid too: a forked child (gunicorn, prefork) must not share its parent's sockets.
    # One client per pool (thread-safe), made once: building a client costs about a millisecond.
    return redis.Redis(connection_pool=redis.ConnectionPool.from_url(
        url, socket_connect_timeout=3, socket_timeout=read_timeout, health_check_interval=30))


def client(settings: Settings, *, blocking_for: float = 0.0) -> redis.Redis:
    """A client on this process's pool for ``settings.redis_url`` (the signals' connection).

    A read gives up after 5 s (redis-py's default), so a blocking command (``BLPOP``) of up to
    ``blocking_for`` seconds needs a client from a pool whose reads wait that long and a margin.
    """
    read_timeout = 5.0 if blocking_for <= 0 else blocking_for + READ_MARGIN_SECONDS
    return _client(settings.redis_url, os.getpid(), read_timeout)


def notify_finished(settings: Settings, *job_ids: int) -> None:
    """Wake whoever waits on each of ``job_ids`` (call after their finishing transaction committed),
    in one round trip; never raises."""
    if not job_ids:
        return
    try:
        with client(settings).pipeline(transaction=True) as pipe:
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
        # One pool for every wait, sized for the longest one allowed.
        longest = max(settings.max_inline_wait_seconds, timeout)
        return client(settings, blocking_for=longest).blpop([KEY.format(job_id=job_id)],
                                                            timeout=max(timeout, 0.01)) is not None
    except redis.RedisError as exc:
        log.warning("event=finish_wait_failed job_id=%s error=%r", job_id, exc)
        return False
