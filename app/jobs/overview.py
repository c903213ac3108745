"""The admin dashboard's numbers: jobs by state, queues, workers, running jobs, failures, usage per user.

Read-only queries (a poll writes nothing) shared by ``/admin`` and ``GET /api/v1/admin/overview``;
``/metrics`` reads the same tables. There is no worker registry table: the workers online are
derived from attempts that have not ended (who runs what, and their last heartbeat).

A poll first reads :func:`version` (a few index lookups); an unchanged version is a 304, and a
changed one is computed once per process by :func:`shared_overview`, however many dashboards poll.
"""

from __future__ import annotations

import functools
import threading
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.jobs.states import RUNNING, STATES
from app.models import Attempt, Job, JobCount, JobEvent, UsageTotal, User, utcnow
from app.settings import DEFAULT_QUEUE, PREDICT_QUEUE, TRAIN_QUEUE, Settings
from app.usage import device_kind

QUEUES = (TRAIN_QUEUE, PREDICT_QUEUE, DEFAULT_QUEUE)
RECENT_FAILURES = 10
RUNNING_SHOWN = 50
# Figures that grow with the clock alone (waits, heartbeat ages, running time) are recounted at
# least this often; anything a job does changes the version at once.
RECOUNT_SECONDS = 30

_shared: dict[str, tuple[tuple, dict[str, Any]]] = {}  # database URL -> (version, overview)
_shared_lock = threading.Lock()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _age(now: datetime, then: datetime | None) -> float | None:
    return round(max(0.0, (now - then).total_seconds()), 1) if then is not None else None


@functools.lru_cache(maxsize=8)
def _broker(url: str):
    import redis

    # One client (and connection pool) per broker, kept: each poll reads the depths.
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)


def queue_depths(settings: Settings) -> dict[str, int | None]:
    """Messages waiting in each broker queue (Redis LLEN); None for all when the broker does not answer."""
    try:
        pipe = _broker(settings.redis_url).pipeline(transaction=False)
        for name in QUEUES:
            pipe.llen(name)
        return dict(zip(QUEUES, pipe.execute()))
    except Exception:  # noqa: BLE001 - a down broker shows as "unknown"; /readyz says why
        return {name: None for name in QUEUES}


def usage(*, session: Session, now: datetime | None = None) -> list[dict[str, Any]]:
    """Per user with jobs: jobs submitted, attempts started and compute seconds (the sum of their
    attempts' run times, a running one up to now; CPU and GPU apart), busiest first.

    Read from the per-user totals (:class:`~app.models.UsageTotal`) plus the attempts that have not
    ended, so the cost follows the number of users and live attempts, not the length of the history.
    """
    now = now or utcnow()
    running: dict[int, dict[str, float]] = defaultdict(lambda: {"cpu": 0.0, "gpu": 0.0})
    for owner_id, started, device in session.execute(
        select(Job.owner_id, Attempt.started_at, Attempt.device)
        .join(Job, Job.id == Attempt.job_id).where(Attempt.ended_at.is_(None))
    ):
        running[owner_id][device_kind(device)] += (now - started).total_seconds()
    rows = []
    totals = (select(UsageTotal.user_id, func.sum(UsageTotal.jobs).label("jobs"),
                     func.sum(UsageTotal.attempts).label("attempts"), func.sum(UsageTotal.cpu_seconds).label("cpu"),
                     func.sum(UsageTotal.gpu_seconds).label("gpu"))
              .group_by(UsageTotal.user_id).having(func.sum(UsageTotal.jobs) > 0).subquery())
    for uid, email, role, jobs, attempts, cpu, gpu in session.execute(
        select(User.id, User.email, User.role, totals.c.jobs, totals.c.attempts, totals.c.cpu, totals.c.gpu)
        .join(totals, totals.c.user_id == User.id)
    ):
        cpu, gpu = cpu + running[uid]["cpu"], gpu + running[uid]["gpu"]
        rows.append({"user_id": uid, "email": email, "role": role, "jobs": jobs, "attempts": attempts,
                     "compute_seconds": round(cpu + gpu, 1), "cpu_seconds": round(cpu, 1),
                     "gpu_seconds": round(gpu, 1), "_seconds": cpu + gpu if attempts else None})
    # Busiest first; users without any attempt last (as SQL's NULLS LAST put them), then by id.
    rows.sort(key=lambda r: (r["_seconds"] is None, -(r["_seconds"] or 0.0), r["user_id"]))
    return [{k: v for k, v in r.items() if k != "_seconds"} for r in rows]


# The counts of jobs per state and queue, kept by the database (:class:`~app.models.JobCount`): a
# few hundred counter rows however many jobs there are.
_COUNTS = select(JobCount.state, JobCount.queue, func.sum(JobCount.jobs)).group_by(JobCount.state, JobCount.queue)
# Each queue's oldest waiting job: the first entry of its range of ix_jobs_state_queue_queued_at.
_OLDEST_QUEUED = select(*(
    select(func.min(Job.queued_at)).where(Job.state == "queued", Job.queue == name).scalar_subquery()
    for name in QUEUES))


def overview(*, session: Session, settings: Settings) -> dict[str, Any]:
    """Everything the admin dashboard shows, as JSON-ready data (all users' jobs); its cost follows
    the number of running jobs, workers and users, not the number of jobs."""
    now = utcnow()
    by_state = dict.fromkeys(STATES, 0)
    queued: dict[str, int] = defaultdict(int)
    for state, queue, jobs in session.execute(_COUNTS):
        by_state[state] = by_state.get(state, 0) + int(jobs)
        if state == "queued":
            queued[queue] += int(jobs)
    oldest = dict(zip(QUEUES, session.execute(_OLDEST_QUEUED).one()))
    depths = queue_depths(settings)
    queues = [{"name": name, "depth": depths.get(name), "queued_jobs": queued.get(name, 0),
               "oldest_wait_seconds": _age(now, oldest.get(name))} for name in QUEUES]
    workers = [
        {"worker": worker, "host": host, "pid": pid, "job_id": job_id, "job_name": name, "attempt": number,
         "started_at": _iso(started), "last_heartbeat_at": _iso(beat), "heartbeat_age_seconds": _age(now, beat)}
        for worker, host, pid, job_id, name, number, started, beat in session.execute(
            select(Attempt.worker, Attempt.host, Attempt.pid, Attempt.job_id, Job.name, Attempt.number,
                   Attempt.started_at, Attempt.heartbeat_at)
            .join(Job, Job.id == Attempt.job_id).where(Attempt.ended_at.is_(None)).order_by(Attempt.worker)
        )
    ]
    running = [
        {"id": job_id, "name": name, "kind": kind, "owner": email, "progress": progress, "epoch": epoch,
         "step": step, "attempt": attempt, "lease_owner": lease_owner, "started_at": _iso(started)}
        for job_id, name, kind, email, progress, epoch, step, attempt, lease_owner, started in session.execute(
            select(Job.id, Job.name, Job.kind, User.email, Job.progress, Job.epoch, Job.step, Job.attempts,
                   Job.lease_owner, Job.started_at)
            .join(User, User.id == Job.owner_id).where(Job.state == "running").order_by(Job.id).limit(RUNNING_SHOWN)
        )
    ]
    failures = [
        {"id": job_id, "name": name, "owner": email, "error_class": cls, "error_message": message,
         "finished_at": _iso(finished)}
        for job_id, name, email, cls, message, finished in session.execute(
            select(Job.id, Job.name, User.email, Job.error_class, Job.error_message, Job.finished_at)
            .join(User, User.id == Job.owner_id).where(Job.state == "failed")
            .order_by(Job.finished_at.desc().nulls_last(), Job.id.desc()).limit(RECENT_FAILURES)
        )
    ]
    return {"generated_at": now.isoformat(), "jobs_by_state": by_state, "queues": queues, "workers": workers,
            "running": running, "recent_failures": failures, "usage": usage(session=session, now=now)}


def version(*, session: Session, settings: Settings, now: datetime | None = None) -> tuple:
    """A cheap version of everything :func:`overview` shows, from index lookups that do not grow with
    the history: the newest event (every state change, claim and end records one), the newest job,
    the running jobs' ``updated_at`` (progress writes and heartbeats stamp it), the broker's queue
    depths, and the current ``RECOUNT_SECONDS`` window of the clock."""
    now = now or utcnow()
    newest = session.execute(
        select(select(func.max(JobEvent.id)).scalar_subquery(), select(func.max(Job.id)).scalar_subquery())
    ).one()
    running = session.execute(select(Job.id, Job.updated_at).where(Job.state == RUNNING).order_by(Job.id)).all()
    return (tuple(newest), tuple(tuple(r) for r in running), tuple(queue_depths(settings).values()),
            int(now.timestamp() // RECOUNT_SECONDS))


def shared_overview(*, session: Session, settings: Settings, version: tuple) -> dict[str, Any]:
    """:func:`overview` as of ``version`` (from :func:`version`), computed once per version in this
    process: every open dashboard polling the same version shares one computation. The result is
    shared: callers must not change it."""
    with _shared_lock:  # the first poll of a new version computes it; the others wait for it
        known = _shared.get(settings.database_url)
        if known is not None and known[0] == version:
            return known[1]
        data = overview(session=session, settings=settings)
        _shared[settings.database_url] = (version, data)
        return data
