"""The JSON API under ``/api/v1``: submit, read, list and control jobs."""

from __future__ import annotations

import logging

from flask import Blueprint, jsonify, request, url_for
from sqlalchemy import select

from app import catalog, datasets, queue
from app.jobs import service
from app.jobs.errors import SpecError
from app.jobs.schemas import parse_spec
from app.jobs.states import STATES
from app.models import JobEvent, Metric, ModelVersion
from app.web import serializers
from app.web.auth import current_user
from app.web.context import db, settings
from app.web.login import api_user, api_write_guard
from app.web.problems import problem

api = Blueprint("api", __name__)
api.before_request(api_user)  # bearer token; a signed-in browser session for reads only
api.before_request(api_write_guard)  # viewers and disabled users: 403 on every write, in one place
log = logging.getLogger(__name__)

MAX_PAGE = 200


def _int_arg(name: str, default: int | None, *, lo: int = 1, hi: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SpecError.at(name, f"must be an integer, not {raw!r}") from None
    if value < lo or (hi is not None and value > hi):
        raise SpecError.at(name, f"must be between {lo} and {hi}")
    return value


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if body is None:
        raise SpecError.at("(body)", "the request body must be a JSON object (Content-Type: application/json)")
    return body


def _conditional(payload: dict):
    """A JSON response with an ETag; a poll whose ``If-None-Match`` matches gets 304 and no body."""
    response = jsonify(payload)
    response.add_etag()
    return response.make_conditional(request)


def _publish(job) -> None:
    if queue.publish(settings(), job_id=job.id, kind=job.kind, token=job.attempts, priority=job.priority):
        service.mark_published(session=db(), job_id=job.id)
        db().commit()


@api.post("/jobs")
def submit_job():
    """Validate a spec, record the job as queued, commit, then publish its wake-up message."""
    spec = parse_spec(_json_body())
    session = db()
    job = service.submit(session=session, owner=current_user(), spec=spec, settings=settings())
    session.commit()
    _publish(job)
    response = jsonify(serializers.job_detail(session, job))
    response.status_code = 201
    response.headers["Location"] = url_for("api.get_job", job_id=job.id)
    return response


@api.get("/jobs")
def list_jobs():
    """The caller's jobs, newest first; ``limit``, ``cursor``, ``state`` and ``kind`` filter."""
    state = request.args.get("state")
    if state and state not in STATES:
        raise SpecError.at("state", f"must be one of {', '.join(STATES)}")
    jobs, next_cursor = service.list_jobs(
        session=db(), user=current_user(), limit=_int_arg("limit", 50, hi=MAX_PAGE),
        before_id=_int_arg("cursor", None), state=state, kind=request.args.get("kind") or None,
    )
    return _conditional({"items": [serializers.job_summary(j) for j in jobs],
                         "next_cursor": str(next_cursor) if next_cursor else None})


@api.get("/jobs/<int:job_id>")
def get_job(job_id: int):
    """One job: state, progress, metrics, checkpoints, result, error."""
    job = service.get_job(session=db(), user=current_user(), job_id=job_id)
    return _conditional(serializers.job_detail(db(), job))


@api.post("/jobs/<int:job_id>/cancel")
def cancel_job(job_id: int):
    """Request cancellation (persisted: works with no worker online)."""
    job = service.cancel(session=db(), user=current_user(), job_id=job_id)
    db().commit()
    return jsonify(serializers.job_detail(db(), job)), 202


@api.post("/jobs/<int:job_id>/retry")
def retry_job(job_id: int):
    """Queue a failed or cancelled job again; it resumes from its newest valid checkpoint."""
    job = service.retry(session=db(), user=current_user(), job_id=job_id, settings=settings())
    db().commit()
    _publish(job)
    return jsonify(serializers.job_detail(db(), job)), 202


@api.post("/jobs/<int:job_id>/pause")
def pause_job(job_id: int):
    """Pause: checkpoint and free the worker (a queued job pauses at once)."""
    job = service.pause(session=db(), user=current_user(), job_id=job_id)
    db().commit()
    return jsonify(serializers.job_detail(db(), job)), 202


@api.post("/jobs/<int:job_id>/resume")
def resume_job(job_id: int):
    """Queue a paused job again; it continues from its checkpoint."""
    job = service.resume(session=db(), user=current_user(), job_id=job_id)
    db().commit()
    _publish(job)
    return jsonify(serializers.job_detail(db(), job)), 202


@api.get("/jobs/<int:job_id>/metrics")
def job_metrics(job_id: int):
    """Metrics reports in order; ``scope`` (epoch|step|test) and ``after`` (an id) filter;
    ``latest=true`` keeps only the newest attempt's report of each epoch/step (one curve)."""
    service.get_job(session=db(), user=current_user(), job_id=job_id)
    stmt = select(Metric).where(Metric.job_id == job_id).order_by(Metric.id).limit(_int_arg("limit", 1000, hi=10000))
    if scope := request.args.get("scope"):
        stmt = stmt.where(Metric.scope == scope)
    if (after := _int_arg("after", None, lo=0)) is not None:
        stmt = stmt.where(Metric.id > after)
    rows = list(db().execute(stmt).scalars())
    if request.args.get("latest") in ("1", "true"):
        # One curve: where a resumed attempt redid an epoch, keep the newest attempt's report.
        newest = {(m.scope, m.epoch, m.step): m for m in rows}
        rows = sorted(newest.values(), key=lambda m: m.id)
    return _conditional({"items": [serializers.metric(m) for m in rows]})


@api.get("/jobs/<int:job_id>/events")
def job_events(job_id: int):
    """The job's events in order (state changes, resumes, failures)."""
    service.get_job(session=db(), user=current_user(), job_id=job_id)
    stmt = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
    if not current_user().is_admin:
        stmt = stmt.where(JobEvent.kind != "traceback")
    return jsonify(items=[serializers.event(e) for e in db().execute(stmt).scalars()])


@api.get("/models")
def list_models():
    """The caller's registered model versions, newest first."""
    stmt = select(ModelVersion).order_by(ModelVersion.id.desc()).limit(_int_arg("limit", 100, hi=MAX_PAGE))
    if not current_user().is_admin:
        stmt = stmt.where(ModelVersion.owner_id == current_user().id)
    return jsonify(items=[serializers.model_version(m) for m in db().execute(stmt).scalars()])


@api.get("/datasets")
def list_datasets():
    """Built-in datasets a spec may name, then the caller's uploads."""
    builtins = [
        {"id": f"{catalog.BUILTIN_PREFIX}{d.name}", "builtin": True, "task": d.task, "source": d.source,
         "description": d.description, "rows": d.num_rows, "features": d.num_features,
         "classes": d.num_classes, "target": d.target}
        for d in catalog.BUILTIN_DATASETS.values()
    ]
    uploads = [serializers.dataset(d) for d in datasets.list_owned(session=db(), user=current_user())]
    return jsonify(items=builtins + uploads)


@api.post("/datasets")
def upload_dataset():
    """Upload a CSV, JSONL or Parquet file (multipart field ``file``); answers with its inferred schema."""
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise SpecError.at("file", "send the dataset as a multipart/form-data field named 'file'")
    dataset = datasets.upload(
        session=db(), owner=current_user(), filename=upload.filename, data=upload.read(), settings=settings(),
        declared_format=request.form.get("format") or None, name=request.form.get("name") or None,
    )
    db().commit()
    response = jsonify(serializers.dataset(dataset))
    response.status_code = 201
    response.headers["Location"] = url_for("api.get_dataset", dataset_id=dataset.id)
    return response


@api.get("/datasets/<int:dataset_id>")
def get_dataset(dataset_id: int):
    """One uploaded dataset with its schema."""
    return jsonify(serializers.dataset(datasets.get(session=db(), user=current_user(), dataset_id=dataset_id)))


@api.errorhandler(405)
def _method_not_allowed(exc):
    return problem(405, "Method Not Allowed", str(exc.description))
