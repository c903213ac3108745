"""Text as it is generated: the worker appends pieces to a Redis stream, the web relays them as SSE.

One stream per job, ``kiln:gen:<job_id>``, bounded (``MAXLEN ~``) and expiring, so nothing stays
behind. Entries are ``{"type": "start", "attempt"}`` when an attempt begins (a client clears what an
earlier attempt wrote), ``{"type": "text", "attempt", "index", "text"}`` per piece of prompt
``index``, and ``{"type": "done", "attempt"}`` after the attempt's finishing transaction committed.
The stream is a view of progress, never state: the job's row holds the result.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import redis

from app.settings import Settings

log = logging.getLogger(__name__)

KEY = "kiln:gen:{job_id}"
MAX_ENTRIES = 10_000
EXPIRE_SECONDS = 600


@lru_cache(maxsize=8)
def _pool(url: str, pid: int) -> redis.ConnectionPool:
    # Keyed by pid too: a forked child must not share its parent's sockets.
    return redis.ConnectionPool.from_url(url, socket_connect_timeout=3, health_check_interval=30)


def client(settings: Settings) -> redis.Redis:
    """A Redis client from this process's pool for ``settings.redis_url``."""
    return redis.Redis(connection_pool=_pool(settings.redis_url, os.getpid()))


class Publisher:
    """Appends one attempt's entries to its job's stream; a Redis error loses only the live view."""

    def __init__(self, settings: Settings, job_id: int, attempt: int):
        self.key, self.attempt = KEY.format(job_id=job_id), attempt
        self._redis = client(settings)
        self._broken = False

    def add(self, kind: str, **fields) -> None:
        """Append an entry of ``kind`` (start, text, done); never raises."""
        if self._broken:
            return
        entry = {"type": kind, "attempt": self.attempt, **fields}
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self.key, {k: str(v) for k, v in entry.items()}, maxlen=MAX_ENTRIES, approximate=True)
                pipe.expire(self.key, EXPIRE_SECONDS).execute()
        except redis.RedisError as exc:
            # The job goes on: its result is in the database whatever happens to the stream.
            log.warning("event=generation_stream_failed key=%s error=%r", self.key, exc)
            self._broken = True


def read(settings: Settings, job_id: int, after: str, block_ms: int) -> list[tuple[str, dict[str, str]]]:
    """Entries of ``job_id``'s stream after id ``after``, waiting up to ``block_ms`` for the first."""
    found = client(settings).xread({KEY.format(job_id=job_id): after}, count=500, block=block_ms)
    if not found:
        return []
    return [(entry_id.decode(), {k.decode(): v.decode() for k, v in fields.items()})
            for entry_id, fields in found[0][1]]
