"""Keeping a prediction worker's serving cache current: warm-up at start, eviction of deleted versions.

Each worker process that takes predictions holds its own cache (``worker.ml.prediction``). When it
starts (Celery's ``worker_process_init``: the main process of a solo worker, each child of a
prefork one) it subscribes to ``kiln:model-deleted`` (``app.model_signals``) and loads the
versions that warm aliases name. A signal drops the deleted checkpoint's model from this process's
cache at once. Pub/sub keeps nothing for a subscriber that is away, so after a lost connection the
process asks the database which of its cached models only deleted versions serve, and drops them.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import redis

from app import model_registry
from app.db import session_scope
from app.model_signals import DELETED_CHANNEL
from app.settings import Settings

log = logging.getLogger(__name__)

# Seconds a listener whose Redis connection failed waits before it reconnects and catches up.
RECONNECT_SECONDS = 1.0


def warm_up(settings: Settings) -> int:
    """Load the versions that warm aliases name into this process's cache (as many as its count
    bound holds, most recently set first); returns how many are cached. A version that cannot be
    loaded is logged and skipped: the worker still starts."""
    from worker.ml import prediction
    from worker.ml.devices import resolve_device
    from worker.runner import model_checkpoint

    prediction.configure_cache(models=settings.predict_cache_models, max_bytes=settings.predict_cache_bytes)
    try:
        with session_scope(settings.database_url) as session:
            wanted = model_registry.warm_versions(session=session)
    except Exception as exc:  # noqa: BLE001 - a worker without its warm models still serves, colder
        log.warning("event=warm_up_failed error=%r", exc)
        return 0
    device = resolve_device("auto")
    loaded = 0
    for ref, path, digest in wanted[:settings.predict_cache_models]:
        started = time.monotonic()
        try:
            prediction.load_model(lambda ref=ref, path=path, digest=digest:
                                  model_checkpoint((ref, path, digest), settings), device, digest=digest)
        except Exception as exc:  # noqa: BLE001 - one broken version must not keep the others cold
            log.warning("event=model_warm_up_failed model=%s sha256=%s error=%r", ref, digest, exc)
            continue
        loaded += prediction.cached(digest, str(device))
        log.info("event=model_warmed model=%s sha256=%s device=%s seconds=%.2f", ref, digest, device,
                 time.monotonic() - started)
    log.info("event=warm_up_done models=%s wanted=%s pid=%s", loaded, len(wanted), os.getpid())
    return loaded


def evict_deleted(settings: Settings) -> int:
    """Drop the cached models that only deleted versions serve (after a gap in the signals); how many."""
    from worker.ml import prediction

    with session_scope(settings.database_url) as session:
        gone = model_registry.deleted_digests(session=session, digests=sorted({k[0] for k in prediction.cache_keys()}))
    return sum(_evict(digest, "catch_up") for digest in gone)


def _evict(digest: str, how: str) -> int:
    from worker.ml import prediction

    count = prediction.evict(digest)
    log.info("event=model_evicted sha256=%s models=%s how=%s pid=%s", digest, count, how, os.getpid())
    return count


def listen_for_deletions(settings: Settings) -> threading.Thread:
    """Subscribe this process to deletion signals: a daemon thread evicts each deleted model, and
    after a lost connection subscribes again and catches up from the database."""
    subscribed = threading.Event()
    thread = threading.Thread(target=_listen, args=(settings, subscribed), name="kiln-model-signals", daemon=True)
    thread.start()
    subscribed.wait(5)  # from here on a deletion reaches this process (unless Redis is away)
    return thread


def _listen(settings: Settings, subscribed: threading.Event) -> None:
    gap = False
    while True:
        pubsub = None
        try:
            pubsub = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_keepalive=True,
                                          health_check_interval=10).pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(DELETED_CHANNEL)
            subscribed.set()
            log.info("event=model_signals_subscribed channel=%s pid=%s", DELETED_CHANNEL, os.getpid())
            if gap:
                evict_deleted(settings)
            while True:
                message = pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "message":
                    data = message["data"]
                    _evict(data.decode() if isinstance(data, bytes) else str(data), "signal")
        except Exception as exc:  # noqa: BLE001 - the listener outlives any Redis or database trouble
            log.warning("event=model_signals_lost error=%r", exc)
            subscribed.set()
            gap = True  # what was published meanwhile is caught up once subscribed again
            time.sleep(RECONNECT_SECONDS)
        finally:
            if pubsub is not None:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001 - a dead connection may fail to close; it is dropped anyway
                    pass


def start(settings: Settings, *, in_background: bool) -> None:
    """Subscribe to deletions, then warm up: here, or (a prefork child, which must report in to its
    parent within seconds) in a daemon thread."""
    listen_for_deletions(settings)
    if in_background:
        threading.Thread(target=warm_up, args=(settings,), name="kiln-warm-up", daemon=True).start()
    else:
        warm_up(settings)
