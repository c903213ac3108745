"""JSON shapes of API resources (built from ORM objects or plain rows alike), and metric downsampling."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Row, Text, cast, select
from sqlalchemy.orm import Session

from app import model_registry
from app.db import json_loads
from app.jobs.metric_curves import Curve
from app.models import Attempt, Checkpoint, Dataset, JobEvent, Metric, ModelVersion
from app.models.base import iso_utc


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC, or None."""
    return value.isoformat().replace("+00:00", "Z") if value else None


def job_summary(job: Any) -> dict[str, Any]:
    """The fields shown in job lists."""
    return {
        "id": job.id,
        "kind": job.kind,
        "name": job.name,
        "state": job.state,
        "progress": round(job.progress, 4),
        "epoch": job.epoch,
        "attempts": job.attempts,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "error": {"class": job.error_class, "message": job.error_message} if job.error_class else None,
    }


def job_detail(session: Session, job: Any) -> dict[str, Any]:
    """Everything a user needs about one job (``job`` is a Job or a row of ``service.read_job``, which
    carries its newest epoch report)."""
    if isinstance(job, Row):
        latest = (job.latest_values, job.latest_epoch) if job.latest_epoch is not None else None
    else:
        latest = session.execute(
            select(Metric.values, Metric.epoch)
            .where(Metric.job_id == job.id, Metric.scope == "epoch").order_by(Metric.id.desc()).limit(1)
        ).one_or_none()
    checkpoints = session.execute(
        select(Checkpoint.__table__).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step, Checkpoint.id)
    )
    model = session.get(ModelVersion, job.model_version_id) if job.model_version_id else None
    base = session.get(ModelVersion, job.init_model_version_id) if job.init_model_version_id else None
    history = session.execute(select(Attempt.__table__).where(Attempt.job_id == job.id).order_by(Attempt.number))
    return _detail(job, latest=latest, checkpoints=checkpoints, history=history, model=model, base=base)


def submitted_job_detail(job: Any) -> dict[str, Any]:
    """:func:`job_detail` of a job just inserted (``app.jobs.service.SubmittedJob``), built from its
    values without reading anything back: a new job has no metrics, checkpoints or attempts yet."""
    return _detail(job, latest=None, checkpoints=(), history=(), model=job.model, base=job.base)


def _detail(job: Any, *, latest: Any, checkpoints: Iterable[Any], history: Iterable[Any],
            model: ModelVersion | None, base: ModelVersion | None) -> dict[str, Any]:
    body = job_summary(job)
    body.update(
        {
            "queue": job.queue,
            "priority": job.priority,
            "max_attempts": job.max_attempts,
            "step": job.step,
            "queued_at": iso(job.queued_at),
            "updated_at": iso(job.updated_at),
            "cancel_requested_at": iso(job.cancel_requested_at),
            "pause_requested_at": iso(job.pause_requested_at),
            "resumed_from_epoch": job.resumed_from_epoch,
            "latest_metrics": dict(latest[0], epoch=latest[1]) if latest else None,
            "checkpoints": [checkpoint(c) for c in checkpoints],
            "attempt_history": [attempt(a) for a in history],
            "model": model_version(model) if model else None,
            # The version init_from was pinned to at submit ("name@N"); null when not fine-tuning.
            "init_from": f"{base.name}@{base.version}" if base else None,
            "result": job.result,
            "spec": job.spec,
        }
    )
    return body


def attempt(a: Any) -> dict[str, Any]:
    """One run of a job by one worker process."""
    return {"number": a.number, "worker": a.worker, "host": a.host, "pid": a.pid, "started_at": iso(a.started_at),
            "ended_at": iso(a.ended_at), "start_epoch": a.start_epoch, "start_step": a.start_step,
            "outcome": a.outcome}


def checkpoint(c: Any) -> dict[str, Any]:
    """A checkpoint row."""
    return {
        "id": c.id, "epoch": c.epoch, "step": c.step, "attempt": c.attempt, "path": c.path,
        "size_bytes": c.size_bytes, "sha256": c.sha256, "is_best": c.is_best, "reason": c.reason,
        "metric": {c.metric_name: c.metric_value} if c.metric_name else None, "created_at": iso(c.created_at),
    }


def model_version(m: ModelVersion) -> dict[str, Any]:
    """A registered model version."""
    return {
        "id": m.id, "name": m.name, "version": m.version, "ref": f"{m.name}@{m.version}", "job_id": m.job_id,
        "arch": m.arch, "task": m.task, "signature": m.signature, "metrics": m.metrics, "created_at": iso(m.created_at),
        "input_schema": model_registry.schema_of(m), "lineage": m.lineage, "deleted_at": iso(m.deleted_at),
        "serving": {"max_batch_size": m.max_batch_size, "max_delay_ms": m.max_delay_ms},
    }


def alias_serving(a: Any) -> dict[str, Any]:
    """A stored alias's serving settings (null limits: its version's, then the global ones)."""
    return {"max_batch_size": a.max_batch_size, "max_delay_ms": a.max_delay_ms, "warm": a.warm}


# A page of reports reads ``values`` as the JSON text it is stored as and ``at`` formatted by the
# database, so neither is parsed and re-encoded in Python, value by value.
METRIC_COLUMNS = (Metric.id, Metric.attempt, Metric.scope, Metric.epoch, Metric.step, cast(Metric.values, Text),
                  iso_utc(Metric.at))


def metrics_page(rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Metrics reports, from rows of :data:`METRIC_COLUMNS`; each one's stored JSON goes into the
    body as it is."""
    if any("NaN" in text or "Infinity" in text for text in (r[5] for r in rows)):
        # Rows from before non-finite numbers were stored as null: parsed, they are written as null.
        return [{"id": id_, "attempt": attempt_, "scope": scope, "epoch": epoch, "step": step,
                 "values": json_loads(values), "at": at} for id_, attempt_, scope, epoch, step, values, at in rows]
    fragment = orjson.Fragment
    return [{"id": id_, "attempt": attempt_, "scope": scope, "epoch": epoch, "step": step,
             "values": fragment(values), "at": at} for id_, attempt_, scope, epoch, step, values, at in rows]


def metric_series(curves: Iterable[Curve]) -> list[dict[str, Any]]:
    """Downsampled curves (one per scope and metric name) as points of ``[id, epoch, step, value]``,
    with ``count``, the points each has in all."""
    return [{"scope": c.scope, "name": c.name, "count": c.count,
             "points": c.points.tolist()}  # (id, epoch, step, value) tuples: JSON arrays
            for c in curves]


def event(e: JobEvent) -> dict[str, Any]:
    """One job event."""
    return {"id": e.id, "at": iso(e.at), "kind": e.kind, "from": e.from_state, "to": e.to_state,
            "attempt": e.attempt, "message": e.message}


def dataset(d: Dataset) -> dict[str, Any]:
    """An uploaded dataset with its inferred schema."""
    return {"id": f"dataset:{d.id}", "builtin": False, "name": d.name, "format": d.format, "rows": d.num_rows,
            "size_bytes": d.size_bytes, "sha256": d.sha256, "schema": d.schema, "created_at": iso(d.created_at)}
