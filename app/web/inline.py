"""Inline answers: after a job's submit committed, wait a bounded time on its finish signal.

The wait holds no database connection: the request's session is closed first, the web process
blocks on Redis (``app.finish_signal``), and the job is read once, in a fresh read session, when
the signal comes or the time is up.
"""

from __future__ import annotations

import time

from flask import g, jsonify, request, url_for

from app.db import session_factory
from app.finish_signal import wait_finished
from app.jobs import service
from app.jobs.errors import InvalidParameter
from app.jobs.states import TERMINAL
from app.web import serializers
from app.web.auth import current_user
from app.web.context import close_session, db, settings


def wait_arg(default: float | None) -> float | None:
    """The ``wait`` query parameter in seconds (capped by ``max_inline_wait_seconds``), else ``default``."""
    raw = request.args.get("wait")
    cap = settings().max_inline_wait_seconds
    if raw is None or raw == "":
        return None if default is None else min(default, cap)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600 or value != value:
        raise InvalidParameter.at("wait", f"must be a number of seconds between 0 and {cap:g}, not {raw!r}")
    return min(value, cap)


def answer(job_id: int, wait: float, *, known: tuple = ()):
    """200 with the finished job if it ends within ``wait`` seconds, else 202 with it (and ``Location``).

    ``known``: model versions the submit already loaded (its plan's model and base); the answer's
    session takes them as they are instead of reading them again, when the job still names them.
    """
    user = current_user()
    deadline = time.monotonic() + wait
    while True:
        close_session()  # committed already: the connection goes back to the pool for the wait
        signalled = wait_finished(settings(), job_id, deadline - time.monotonic())
        # A read session, closed at teardown: as a GET's (poll), each statement reads without a
        # BEGIN and ROLLBACK around them on PostgreSQL.
        g.db_session = session_factory(settings().database_url, poll=True)()
        row = service.read_job(session=db(), user=user, job_id=job_id)
        # A signal for an attempt that was requeued (a retryable failure) means: wait for the next one.
        if row.state in TERMINAL or not signalled or time.monotonic() >= deadline:
            break
    # Into the answer's identity map (held here: it keeps clean objects weakly), so job_detail's
    # get() of the job's model version reads no row.
    merged = [db().merge(version, load=False) for version in known
              if version is not None and version.id in (row.model_version_id, row.init_model_version_id)]
    response = jsonify(serializers.job_detail(db(), row))
    response.headers["Location"] = url_for("api.get_job", job_id=job_id)
    response.status_code = 200 if row.state in TERMINAL else 202
    del merged
    return response
