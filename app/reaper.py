"""The reaper/reconciler loop: one acting instance, safe to run several (they take a lease)."""

from __future__ import annotations

import logging
import os
import socket
import threading

from app import queue
from app.db import session_scope
from app.jobs import recovery, service
from app.settings import Settings

log = logging.getLogger(__name__)


def tick(settings: Settings, *, owner: str) -> dict[str, int]:
    """One pass: reap expired leases, then republish queued jobs that lack a live message."""
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
    return {"acting": 1, "reaped": len(reaped), "republished": published}


def run_forever(settings: Settings, stop: threading.Event | None = None) -> None:
    """Tick every ``reaper_interval_seconds`` until ``stop`` is set."""
    stop = stop or threading.Event()
    owner = f"{socket.gethostname()}:{os.getpid()}"
    log.info("event=reaper_started owner=%s interval=%s", owner, settings.reaper_interval_seconds)
    while not stop.is_set():
        try:
            tick(settings, owner=owner)
        except Exception as exc:  # noqa: BLE001 - keep reaping through database or broker blips
            log.warning("event=reaper_tick_failed error=%r", exc)
        stop.wait(settings.reaper_interval_seconds)
