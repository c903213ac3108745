"""The elapsed time and ETA shown on a job's page."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from app.web.job_timing import duration_text, elapsed_and_eta

START = datetime(2025, 1, 31, 12, 0, tzinfo=timezone.utc)


def test_a_running_job_a_quarter_done_has_three_times_its_elapsed_left():
    elapsed, eta = elapsed_and_eta(state="running", progress=0.25, started_at=START, finished_at=None,
                                   now=START + timedelta(seconds=60))
    assert elapsed == 60 and eta == 180


def test_no_eta_without_progress_or_once_ended_and_nothing_before_start():
    now = START + timedelta(seconds=90)
    assert elapsed_and_eta(state="running", progress=0.0, started_at=START, finished_at=None, now=now) == (90, None)
    assert elapsed_and_eta(state="paused", progress=0.5, started_at=START, finished_at=None, now=now) == (90, None)
    # Paused (or queued again) at START + 40 s: the clock stands there, however late the page asks.
    for state in ("paused", "queued"):
        stopped = elapsed_and_eta(state=state, progress=0.5, started_at=START, finished_at=None, now=now,
                                  stopped_at=START + timedelta(seconds=40))
        assert stopped == (40, None), state
    running = elapsed_and_eta(state="running", progress=0.5, started_at=START, finished_at=None, now=now,
                              stopped_at=START + timedelta(seconds=40))
    assert running == (90, 90)  # a running job's clock runs up to now
    ended = elapsed_and_eta(state="succeeded", progress=1.0, started_at=START,
                            finished_at=START + timedelta(seconds=30), now=now)
    assert ended == (30, None)  # start to finish, not start to now
    assert elapsed_and_eta(state="queued", progress=0.0, started_at=None, finished_at=None, now=now) == (None, None)


def test_durations_read_as_whole_units():
    assert duration_text(130) == "2 min 10 s"
    assert duration_text(60) == "1 min"
    assert duration_text(3900) == "1 h 5 min"
    assert duration_text(4.4) == "4 s"
