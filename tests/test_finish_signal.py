"""The finish signal on a real Redis: a waiter wakes when the worker's signal comes, even a late one."""

from __future__ import annotations

import threading
import time

from app import finish_signal


def test_a_wait_longer_than_a_redis_read_timeout_still_receives_a_late_signal(settings):
    # redis-py gives up a socket read after 5 s by default; the signal here comes after 6 s.
    job_id = 10**9 + int(time.time() * 1000) % 10**6
    pusher = threading.Timer(6.0, finish_signal.notify_finished, args=(settings, job_id))
    pusher.start()
    try:
        assert finish_signal.wait_finished(settings, job_id, timeout=min(30.0, settings.max_inline_wait_seconds))
    finally:
        pusher.cancel()


def test_a_signal_pushed_before_the_wait_is_still_found_and_no_signal_times_out(settings):
    job_id = 2 * 10**9 + int(time.time() * 1000) % 10**6
    finish_signal.notify_finished(settings, job_id)
    assert finish_signal.wait_finished(settings, job_id, timeout=5)
    assert not finish_signal.wait_finished(settings, job_id, timeout=0.2)  # the one signal was taken
