"""The JSON API under ``/api/v1``: submit, read, list and control jobs."""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone

from flask import Blueprint, Response, jsonify, request, url_for
from werkzeug.exceptions import RequestEntityTooLarge
from sqlalchemy import select

from werkzeug.formparser import FormDataParser

from app import catalog, datasets, storage
from app.db import json_loads
from app.jobs import metric_curves, service
from app.jobs.errors import InvalidParameter, SpecError
from app.jobs.schemas import parse_spec
from app.jobs.states import STATES
from app.models import MAX_ID, JobEvent, Metric, ModelVersion, utcnow
from app.web import inline, rate_limits, revalidate, serializers
from app.web.auth import current_user
from app.web.context import db, reader, release, release_reader, settings
from app.web import idempotency
from app.web.idempotency import json_view as idempotent
from app.web.publishing import publish
from app.web.login import api_user, api_write_guard

api = Blueprint("api", __name__)
api.before_request(api_user)  # bearer token; a signed-in browser session for reads only
api.before_request(api_write_guard)  # viewers and disabled users: 403 on every write, in one place
api.after_request(idempotency.store_answer)  # a claimed Idempotency-Key keeps the answer it got


@api.before_request
def _json_limit():
    """A JSON body has its own, small limit (``max_json_bytes``), apart from the upload limit, decided
    from its Content-Length (a chunked body without one is bounded by the upload limit)."""
    if request.mimetype == "application/json" or request.mimetype.endswith("+json"):
        limit = settings().max_json_bytes
        if request.content_length is not None and request.content_length > limit:
            raise RequestEntityTooLarge(f"a JSON body may be at most {limit} bytes (KILN_MAX_JSON_BYTES)")
log = logging.getLogger(__name__)

MAX_PAGE = 200
MAX_METRICS_PAGE = 10_000
# ``points=N`` reads at most this many reports (the whole series of any realistic job) per request.
DOWNSAMPLE_ROWS = 200_000
MAX_POINTS = 10_000
METRIC_SCOPES = ("epoch", "step", "test")
METADATA_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _int_arg(name: str, default: int | None, *, lo: int = 1, hi: int = MAX_ID) -> int | None:
    """Query parameter ``name`` as an integer in ``lo..hi`` (ASCII digits only), else a 422 naming it."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    # int() would take "٣", " 7" and "1_000"; "²" passes isdigit() yet fails int(): accept plain digits.
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidParameter.at(name, f"must be an integer between {lo} and {hi}, not {raw!r}")
    value = int(raw)
    if value < lo or value > hi:
        raise InvalidParameter.at(name, f"must be between {lo} and {hi}")
    return value


def _time_arg(name: str) -> datetime | None:
    """Query parameter ``name`` as an ISO 8601 time (UTC when it names no zone), else a 422 naming it."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        # fromisoformat takes "Z" from Python 3.11; a "+" sent unescaped in a query arrives as " ".
        moment = datetime.fromisoformat(raw.strip().replace(" ", "+") if "T" in raw else raw.strip())
    except ValueError:
        raise InvalidParameter.at(name, f"must be an ISO 8601 time (2025-01-31T12:00:00Z), not {raw[:40]!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if body is None:
        raise SpecError.at("(body)", "the request body must be a JSON object (Content-Type: application/json)")
    return body


def _not_modified(etag: str):
    """304 when the poll's ``If-None-Match`` already has ``etag`` (decided before any body is built);
    otherwise the read is counted against the caller's budget now, if it was deferred (a 429 then)."""
    if request.if_none_match.contains_weak(etag):
        response = Response(status=304)
        response.set_etag(etag)
        return response
    rate_limits.count_deferred_read()
    return None


def _tagged(payload: dict, etag: str):
    response = jsonify(payload)
    response.set_etag(etag)
    return response


@api.post("/jobs")
@idempotent
def submit_job():
    """Validate a spec and record the job as queued (one write transaction), then publish its wake-up message."""
    spec = parse_spec(_json_body())
    wait = inline.wait_arg(default=None)
    user = current_user()
    plan = service.check_submit(session=reader(), owner=user, spec=spec, settings=settings())
    release_reader()  # its connection goes back before the write session takes one (no pool deadlock)
    session = db()
    job = service.record_submit(session=session, owner=user, plan=plan, settings=settings(), published_at=utcnow())
    session.commit()
    publish(job, recorded=True)
    if wait is not None:  # ?wait=N: 200 with the finished job, or 202 to poll
        return inline.answer(job.id, wait, known=(plan.model, plan.base))
    response = jsonify(serializers.submitted_job_detail(job))  # from the inserted values: nothing read back
    response.status_code = 201
    response.headers["Location"] = url_for("api.get_job", job_id=job.id)
    return response


@api.get("/jobs")
def list_jobs():
    """The caller's jobs, newest first; ``limit`` and ``cursor`` page; ``state``, ``kind``, ``name``
    (substring), ``metadata.<key>``, ``created_after``, ``created_before`` and ``updated_after`` filter."""
    state = request.args.get("state")
    if state and state not in STATES:
        raise InvalidParameter.at("state", f"must be one of {', '.join(STATES)}")
    user = current_user()
    limit, cursor, kind = _int_arg("limit", 50, hi=MAX_PAGE), _int_arg("cursor", None), request.args.get("kind") or None
    name = request.args.get("name") or None
    if name is not None and len(name) > 200:
        raise InvalidParameter.at("name", "must be at most 200 characters")
    metadata = {}
    for param, value in request.args.items():
        if param.startswith("metadata."):
            key = param[len("metadata."):]
            if not METADATA_KEY.fullmatch(key):
                raise InvalidParameter.at(param, "a metadata key is 1 to 64 letters, digits, '_', '-' or '.'")
            metadata[key] = value
    times = {p: _time_arg(p) for p in ("created_after", "created_before", "updated_after")}
    # Any change to a job the caller may list changes the version: decided before the page is read.
    version = revalidate.version(lambda: service.job_list_version(session=db(), user=user))
    etag = service.etag("jobs", version, user.id, user.is_admin, limit,
                        cursor, state, kind, name, sorted(metadata.items()), sorted(times.items()))
    if (unchanged := _not_modified(etag)) is not None:
        return unchanged
    jobs, next_cursor = service.list_jobs(
        session=db(), user=user, limit=limit, before_id=cursor, state=state, kind=kind, name=name,
        metadata=metadata, **times,
    )
    return _tagged({"items": [serializers.job_summary(j) for j in jobs],
                    "next_cursor": str(next_cursor) if next_cursor else None}, etag)


@api.get("/jobs/<int:job_id>")
def get_job(job_id: int):
    """One job: state, progress, metrics, checkpoints, result, error."""
    if request.if_none_match:  # a revalidating poll: decided from the version alone
        version = revalidate.version(lambda: service.job_version(session=db(), user=current_user(), job_id=job_id))
        etag = service.etag("job", job_id, version)
        if (unchanged := _not_modified(etag)) is not None:
            return unchanged
    job = service.read_job(session=db(), user=current_user(), job_id=job_id)
    return _tagged(serializers.job_detail(db(), job), service.etag("job", job_id, service.version_of(job)))


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
    publish(job, recorded=False)
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
    publish(job, recorded=False)
    return jsonify(serializers.job_detail(db(), job)), 202


@api.get("/jobs/<int:job_id>/metrics")
def job_metrics(job_id: int):
    """Metrics reports in order, paged with ``after`` (an id) and ``limit``; ``since`` (ISO time) starts there; ``scope`` (epoch|step|test)
    filters; ``latest=true`` keeps only the newest attempt's report of each epoch/step (one curve);
    ``points=N`` answers one downsampled curve per metric instead of the reports."""
    scope = request.args.get("scope") or None
    if scope and scope not in METRIC_SCOPES:
        raise InvalidParameter.at("scope", f"must be one of {', '.join(METRIC_SCOPES)}")
    points = _int_arg("points", None, lo=4, hi=MAX_POINTS)
    limit = _int_arg("limit", DOWNSAMPLE_ROWS if points else 1000, hi=DOWNSAMPLE_ROWS if points else MAX_METRICS_PAGE)
    after = _int_arg("after", None, lo=0)
    since = _time_arg("since")
    latest = request.args.get("latest") in ("1", "true")
    # points=N alone draws the curves kept as reports arrive; with a filter, from the reports it selects.
    kept_curves = bool(points) and after is None and since is None and not latest and "limit" not in request.args
    newest = revalidate.version(
        lambda: service.metrics_version(session=db(), user=current_user(), job_id=job_id, scope=scope))
    etag = service.etag("metrics", job_id, newest, scope, points, limit, after, since, latest, kept_curves)
    if (unchanged := _not_modified(etag)) is not None:
        return unchanged
    if kept_curves:
        # The whole series, from the curves kept as reports arrive: no report is read or parsed.
        curves = metric_curves.read(session=db(), job_id=job_id, scope=scope, points=points)
        return _tagged({"points": points, "series": serializers.metric_series(curves), "next_after": None}, etag)
    stmt = select(*serializers.METRIC_COLUMNS).where(Metric.job_id == job_id).order_by(Metric.id).limit(limit)
    if scope:
        stmt = stmt.where(Metric.scope == scope)
    if after is not None:
        stmt = stmt.where(Metric.id > after)
    if since is not None:
        stmt = stmt.where(Metric.at >= since)
    rows = db().connection().execute(stmt).all()  # Core rows: no ORM loading per row
    next_after = rows[-1][0] if len(rows) == limit else None
    if latest:
        # One curve: where a resumed attempt redid an epoch, keep the newest attempt's report.
        newest_report = {(r[2], r[3], r[4]): r for r in rows}
        rows = sorted(newest_report.values(), key=lambda r: r[0])
    if points:
        curves = metric_curves.curves_of(((r[0], r[2], r[3], r[4], json_loads(r[5])) for r in rows), points)
        body = {"points": points, "series": serializers.metric_series(curves)}
    else:
        body = {"items": serializers.metrics_page(rows)}
    body["next_after"] = next_after
    return _tagged(body, etag)


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
    stmt = (select(ModelVersion).where(ModelVersion.deleted_at.is_(None)).order_by(ModelVersion.id.desc())
            .limit(_int_arg("limit", 100, hi=MAX_PAGE)))
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
    """Upload a CSV, JSONL or Parquet file (multipart field ``file``); answers with its inferred schema.

    The file part streams from the request straight into a temporary file under storage, in
    chunks, while its sha256 is counted: it is never held whole in memory.
    """
    if request.mimetype != "multipart/form-data":
        raise SpecError.at("file", "send the dataset as a multipart/form-data field named 'file'")
    owner_id = current_user().id
    release()  # no transaction stays open while the body streams in
    writers: list[storage.AtomicWriter] = []

    def to_storage(**_: object) -> storage.AtomicWriter:
        writers.append(storage.AtomicWriter(settings().storage_root, f"datasets/{owner_id}"))
        return writers[-1]

    try:
        parser = FormDataParser(stream_factory=to_storage, max_content_length=request.max_content_length,
                                max_form_memory_size=request.max_form_memory_size,
                                max_form_parts=request.max_form_parts)
        _, form, files = parser.parse_from_environ(request.environ)
        upload = files.get("file")
        if upload is None or not upload.filename:
            raise SpecError.at("file", "send the dataset as a multipart/form-data field named 'file'")
        # The file's sha256 (counted while it streamed in) and the fields are the request's fingerprint.
        if (replayed := idempotency.replay(upload.stream.sha256, upload.filename, form.to_dict())) is not None:
            return replayed
        dataset = datasets.store(
            session=db(), owner=current_user(), filename=upload.filename, writer=upload.stream, settings=settings(),
            declared_format=form.get("format") or None, name=form.get("name") or None,
        )
        db().commit()
    finally:
        for writer in writers:
            writer.abort()  # every part but the stored one (and that one on failure)
    response = jsonify(serializers.dataset(dataset))
    response.status_code = 201
    response.headers["Location"] = url_for("api.get_dataset", dataset_id=dataset.id)
    return response


@api.get("/datasets/<int:dataset_id>")
def get_dataset(dataset_id: int):
    """One uploaded dataset with its schema."""
    return jsonify(serializers.dataset(datasets.get(session=db(), user=current_user(), dataset_id=dataset_id)))

