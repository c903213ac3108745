"""Server-Sent Events of a running generation on the ``api`` blueprint: ``GET /jobs/<id>/stream``.

The job is read (and its owner checked) once; then the request's session is closed and the
relay reads the job's Redis stream (``app.generation_stream``) with blocking XREADs, holding no
database connection or transaction. It reads the job's state in a short read session only when an
attempt says it is done or the stream has been quiet for ``STATE_CHECK_SECONDS``, and ends with an
``end`` event once the job is terminal, or after ``MAX_STREAM_SECONDS`` (at most
``KILN_LOG_FOLLOW_MAX_SECONDS``) whatever happens.
"""

from __future__ import annotations

import json
import time

import redis
from flask import Response

from app import generation_stream
from app.db import session_scope
from app.jobs import service
from app.jobs.states import TERMINAL
from app.models import User
from app.web.api import api
from app.web.auth import current_user
from app.web.context import close_session, db, settings

MAX_STREAM_SECONDS = 300
STATE_CHECK_SECONDS = 2.0
KEEPALIVE_SECONDS = 15.0
BLOCK_MS = 1000


def _event(name: str, data: dict) -> str:
    # JSON data keeps newlines in generated text on one SSE data line.
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _state(cfg, user_id: int, job_id: int) -> str:
    with session_scope(cfg.database_url) as session:
        return service.read_job(session=session, user=session.get(User, user_id), job_id=job_id).state


@api.get("/jobs/<int:job_id>/stream")
def stream_job(job_id: int):
    """The job's generated text as Server-Sent Events (``start``, ``token``, ``end``); 404 for another's job."""
    user = current_user()
    state = service.read_job(session=db(), user=user, job_id=job_id).state
    user_id = user.id
    close_session()  # nothing below holds a connection while it waits on Redis
    cfg = settings()

    def events():
        # Bounded by the same knob as a followed log, so a stream of a job that never starts ends too.
        deadline = time.monotonic() + min(MAX_STREAM_SECONDS, cfg.log_follow_max_seconds)
        last_id, quiet_since, checked = "0-0", time.monotonic(), time.monotonic()
        now_state = state
        yield "retry: 3000\n\n"
        while time.monotonic() < deadline:
            try:
                entries = generation_stream.read(cfg, job_id, last_id, BLOCK_MS)
            except redis.RedisError:
                entries = []
                time.sleep(BLOCK_MS / 1000)
            done = False
            for entry_id, fields in entries:
                last_id = entry_id
                kind = fields.pop("type", "")
                fields = {k: int(v) if k in ("attempt", "index") else v for k, v in fields.items()}
                if kind == "text":
                    yield _event("token", fields)
                elif kind == "start":
                    yield _event("start", fields)
                elif kind == "done":
                    done = True
            if entries:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            if done or now_state in TERMINAL or time.monotonic() - checked >= STATE_CHECK_SECONDS:
                checked = time.monotonic()
                now_state = _state(cfg, user_id, job_id)
                if now_state in TERMINAL:
                    # A last read: pieces written just before the finish are relayed before the end.
                    try:
                        rest = [] if done else generation_stream.read(cfg, job_id, last_id, 1)
                    except redis.RedisError:
                        rest = []
                    for _, fields in rest:
                        if fields.pop("type", "") == "text":
                            yield _event("token", {k: int(v) if k in ("attempt", "index") else v
                                                   for k, v in fields.items()})
                    yield _event("end", {"state": now_state})
                    return
        yield _event("end", {"state": now_state, "timed_out": True})

    response = Response(events(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # proxies pass each event on at once
    return response
