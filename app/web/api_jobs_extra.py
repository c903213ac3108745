"""API routes for a job's checkpoints and log, and for usage, registered on the ``/api/v1`` blueprint.

Each is a thin view over a service: checkpoints in :mod:`app.jobs.service`, the log in
:mod:`app.jobs.job_log`, usage in :mod:`app.usage`.
"""

from __future__ import annotations

import base64
import time

from flask import Response, jsonify, request, send_file, stream_with_context

from app import storage, usage
from app.jobs import job_log, service
from app.jobs.errors import InvalidParameter, NotFound
from app.web import serializers
from app.web.api import _int_arg, _time_arg, api
from app.web.auth import current_user
from app.web.context import db, settings

MAX_TAIL = 10_000
# A follow polls the events table this often and sends a comment line when idle this long (proxies
# drop silent connections); it stops after settings().log_follow_max_seconds.
FOLLOW_POLL_SECONDS = 1.0
FOLLOW_HEARTBEAT_SECONDS = 15.0


@api.get("/jobs/<int:job_id>/checkpoints")
def list_checkpoints(job_id: int):
    """The job's checkpoints, oldest first, each with its download URL."""
    rows = service.list_checkpoints(session=db(), user=current_user(), job_id=job_id)
    return jsonify(items=[serializers.checkpoint(c) | {"download": f"/api/v1/jobs/{job_id}/checkpoints/{c.id}/download"}
                          for c in rows])


@api.get("/jobs/<int:job_id>/checkpoints/<int:checkpoint_id>/download")
def download_checkpoint(job_id: int, checkpoint_id: int):
    """The checkpoint's file, streamed from storage, with its sha256 as ``Repr-Digest`` (RFC 9530)."""
    checkpoint = service.get_checkpoint(session=db(), user=current_user(), job_id=job_id, checkpoint_id=checkpoint_id)
    db().rollback()  # the file streams without a transaction open
    try:
        path = storage.resolve(settings().storage_root, checkpoint.path)
        handle = open(path, "rb")  # noqa: SIM115 - send_file closes it when the body is done
    except (storage.StorageError, FileNotFoundError):
        raise NotFound(f"the file of checkpoint {checkpoint_id} is missing from storage") from None
    response = send_file(handle, mimetype="application/octet-stream", as_attachment=True,
                         download_name=f"job-{job_id}-checkpoint-{checkpoint_id}{path.suffix}",
                         conditional=False, etag=checkpoint.sha256)
    digest = base64.b64encode(bytes.fromhex(checkpoint.sha256)).decode()
    response.headers["Repr-Digest"] = f"sha-256=:{digest}:"
    response.headers["Content-Length"] = str(path.stat().st_size)
    return response


def _line_json(line: job_log.LogLine) -> dict:
    return {"id": line.id, "at": serializers.iso(line.at), "level": line.level, "attempt": line.attempt,
            "kind": line.kind, "message": line.message, "text": line.text()}


@api.get("/jobs/<int:job_id>/logs")
def job_logs(job_id: int):
    """The job's log lines (its events); ``tail=N`` keeps the last N; ``follow=true`` or
    ``Accept: text/event-stream`` streams new lines as Server-Sent Events until the job ends."""
    tail = _int_arg("tail", None, hi=MAX_TAIL)
    follow = request.args.get("follow") in ("1", "true") or (
        request.accept_mimetypes.best == "text/event-stream")
    user = current_user()
    lines = job_log.tail(session=db(), user=user, job_id=job_id, lines=tail)
    if not follow:
        return jsonify(items=[_line_json(x) for x in lines])
    last_id = request.headers.get("Last-Event-ID", "")
    if last_id:
        if not (last_id.isascii() and last_id.isdigit()):
            raise InvalidParameter.at("Last-Event-ID", "must be an event id")
        lines = [x for x in lines if x.id > int(last_id)]
    session = db()
    session.close()  # no transaction (or pooled connection) is held between polls
    follow_max = settings().log_follow_max_seconds

    def stream():
        cursor = lines[-1].id if lines else int(last_id or 0)
        for line in lines:
            yield f"id: {line.id}\nevent: log\ndata: {line.text()}\n\n"
        started = last_sent = time.monotonic()
        while time.monotonic() - started < follow_max:
            try:
                new, ended = job_log.since(session=session, user=user, job_id=job_id, after_id=cursor)
            finally:
                session.close()
            for line in new:
                cursor = line.id
                yield f"id: {line.id}\nevent: log\ndata: {line.text()}\n\n"
                last_sent = time.monotonic()
            if ended:
                yield "event: end\ndata: the job has ended\n\n"
                return
            if time.monotonic() - last_sent >= FOLLOW_HEARTBEAT_SECONDS:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            time.sleep(FOLLOW_POLL_SECONDS)
        yield "event: timeout\ndata: follow again with Last-Event-ID to continue\n\n"

    return Response(stream_with_context(stream()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@api.get("/usage")
def get_usage():
    """CPU/GPU seconds, jobs and storage bytes per user and per job over ``from``..``to`` (own; admins
    may pass ``user=<id>`` or see everyone)."""
    start, end = _time_arg("from"), _time_arg("to")
    if start is not None and end is not None and end <= start:
        raise InvalidParameter.at("to", "must be after 'from'")
    user_id = _int_arg("user", None)
    return jsonify(usage.report(session=db(), actor=current_user(), start=start, end=end, user_id=user_id))
