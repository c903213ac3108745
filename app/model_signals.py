"""Model-version signals from the web to every prediction worker, over Redis pub/sub.

After a version's deletion committed, the web publishes its checkpoint's sha256 on
``kiln:model-deleted``; each prediction worker process subscribes at start and drops that model
from its serving cache (``worker/model_cache.py``). Pub/sub reaches every subscriber at once but
keeps nothing for one that is disconnected at that moment, so the signal only frees memory early:
a worker that reconnects checks its cache against the database, and a worker handed a deleted
version refuses it and evicts it on use (the database is the truth, the signal a wake-up).
"""

from __future__ import annotations

import logging

import redis

from app.finish_signal import client
from app.settings import Settings

log = logging.getLogger(__name__)

DELETED_CHANNEL = "kiln:model-deleted"


def announce_deleted(settings: Settings, digest: str) -> int:
    """Tell every subscribed worker process that the model with checkpoint sha256 ``digest`` was
    deleted (call after the deletion committed); how many received it, 0 on a Redis error (logged)."""
    try:
        return int(client(settings).publish(DELETED_CHANNEL, digest))
    except redis.RedisError as exc:
        log.warning("event=model_deleted_signal_failed sha256=%s error=%r", digest, exc)
        return 0
