"""Elapsed time and a naive ETA for a job's progress, as the job's page shows them."""

from __future__ import annotations

from datetime import datetime

from app.jobs.states import RUNNING, TERMINAL


def duration_text(seconds: float) -> str:
    """``2 min 10 s``, ``1 h 5 min``, ``45 s``: whole units, the two largest only."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"


def elapsed_and_eta(*, state: str, progress: float, started_at: datetime | None, finished_at: datetime | None,
                    now: datetime, stopped_at: datetime | None = None) -> tuple[float | None, float | None]:
    """Seconds elapsed and seconds left, or None: since the start up to now while running, up to the
    finish once ended, and up to ``stopped_at`` (the job's last write: the pause or requeue) while it
    is paused or waiting in the queue again, so the clock stands still while nothing runs. A page
    then changes only when its job does, which lets a poll of an unchanged job be a 304.

    The ETA assumes the rest runs at the average speed so far: elapsed x (1 - p) / p, only while
    running with 0 < p < 1.
    """
    if started_at is None:
        return None, None
    if state in TERMINAL and finished_at is not None:
        end = finished_at
    elif state != RUNNING and stopped_at is not None:
        end = stopped_at
    else:
        end = now
    elapsed = max(0.0, (end - started_at).total_seconds())
    if state != RUNNING or not 0 < progress < 1:
        return elapsed, None
    return elapsed, elapsed * (1 - progress) / progress


def timing_text(job, now: datetime) -> str:
    """``2 min 10 s elapsed, about 1 min left`` for a job, or ``""`` before it started."""
    elapsed, eta = elapsed_and_eta(state=job.state, progress=job.progress or 0.0, started_at=job.started_at,
                                   finished_at=job.finished_at, now=now, stopped_at=job.updated_at)
    if elapsed is None:
        return ""
    text = f"{duration_text(elapsed)} elapsed"
    return text if eta is None else f"{text}, about {duration_text(eta)} left"
