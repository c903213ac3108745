"""The reaper/reconciler loop: one acting instance, safe to run several (they take a lease)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from app import queue, webhooks
from app.db import session_scope
from app.jobs import recovery, service, storage_gc
from app.settings import Settings

log = logging.getLogger(__name__)
SWEEP_EVERY_SECONDS = 600.0


def tick(settings: Settings, *, owner: str, sweep: bool = False) -> dict[str, int]:
    """One pass: reap expired leases, republish queued jobs that lack a live message, and (when
    ``sweep``) delete orphaned checkpoint files."""
    with session_scope(settings.database_url) as session:
        if not recovery.acquire_lease(session=session, name="reaper", owner=owner,
                                      seconds=max(10.0, settings.reaper_interval_seconds * 3)):
            return {"acting": 0}
    with session_scope(settings.database_url) as session:
        reaped = recovery.reap_expired(session=session)
    for job_id, state in reaped:
        log.warning("event=reaped job_id=%s new_state=%s", job_id, state)
    with session_scope(settings.database_url) as session:
        wakeups = recovery.due_wakeups(session=session, settings=settings)
    published = 0
    for w in wakeups:
        if queue.publish(settings, job_id=w.job_id, kind=w.kind, token=w.token, priority=w.priority):
            published += 1
            with session_scope(settings.database_url) as session:
                service.mark_published(session=session, job_id=w.job_id)
    hooks = sweep_webhooks(settings)
    swept = 0
    if sweep:
        with session_scope(settings.database_url) as session:
            removed = storage_gc.sweep_orphans(session=session, root=settings.storage_root,
                                               older_than_seconds=max(3600.0, settings.lease_seconds * 4))
        swept = len(removed)
        if removed:
            log.info("event=orphans_removed count=%s", swept)
    return {"acting": 1, "reaped": len(reaped), "republished": published, "swept": swept, **hooks}


def sweep_webhooks(settings: Settings) -> dict[str, int]:
    """Write due ``progress`` events to the outbox and publish deliveries whose message is overdue or lost."""
    with session_scope(settings.database_url) as session:
        progress = webhooks.record_progress(session=session, settings=settings)
        # Committed with published_at stamped; the progress rows just written are published by the
        # after-commit hook (``webhooks.configure``), the overdue ones below.
        overdue = webhooks.due(session=session, settings=settings)
    for delivery_id in overdue:
        queue.publish_webhook(settings, delivery_id=delivery_id)
    if overdue:
        log.info("event=webhooks_republished count=%s", len(overdue))
    return {"webhook_progress": progress, "webhooks_republished": len(overdue)}


def run_forever(settings: Settings, stop: threading.Event | None = None) -> None:
    """Tick every ``reaper_interval_seconds`` until ``stop`` is set."""
    stop = stop or threading.Event()
    owner = f"{socket.gethostname()}:{os.getpid()}"
    webhooks.configure(settings)
    log.info("event=reaper_started owner=%s interval=%s", owner, settings.reaper_interval_seconds)
    next_sweep = 0.0
    while not stop.is_set():
        try:
            due = time.monotonic() >= next_sweep
            tick(settings, owner=owner, sweep=due)
            if due:
                next_sweep = time.monotonic() + SWEEP_EVERY_SECONDS
        except Exception as exc:  # noqa: BLE001 - keep reaping through database or broker blips
            log.warning("event=reaper_tick_failed error=%r", exc)
        stop.wait(settings.reaper_interval_seconds)
