"""JSON shapes of API resources (built from ORM objects or plain rows alike), and metric downsampling."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import model_registry
from app.models import Attempt, Checkpoint, Dataset, JobEvent, Metric, ModelVersion


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
    """Everything a user needs about one job (``job`` is a Job or a row of the service's DETAIL_COLUMNS)."""
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
            "latest_metrics": dict(latest.values, epoch=latest.epoch) if latest else None,
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
    }


# The columns a metrics row is read with, in the order :func:`metric` and :func:`metric_series` unpack.
METRIC_COLUMNS = (Metric.id, Metric.attempt, Metric.scope, Metric.epoch, Metric.step, Metric.values, Metric.at)


def metric(row: Sequence[Any]) -> dict[str, Any]:
    """One metrics report, from a row of :data:`METRIC_COLUMNS`."""
    id_, attempt_, scope, epoch, step, values, at = row
    return {"id": id_, "attempt": attempt_, "scope": scope, "epoch": epoch, "step": step, "values": values,
            "at": iso(at)}


def downsample(values: Sequence[float], points: int) -> list[int]:
    """Indices of ``values`` to draw with at most ``points`` (>= 4) points: the series is cut into
    ``points // 4`` equal buckets and each keeps its first, last, smallest and largest value, so
    spikes and the ends survive. Returns every index when the series is short enough."""
    n = len(values)
    if n <= points:
        return list(range(n))
    ys = np.asarray(values, dtype=np.float64)
    buckets = max(1, points // 4)
    bounds = [b * n // buckets for b in range(buckets + 1)]
    kept: list[int] = []
    for lo, hi in zip(bounds, bounds[1:]):
        if lo >= hi:
            continue
        part = ys[lo:hi]  # argmin/argmax keep the first of equal values, as min()/max() would
        kept.extend(sorted({lo, hi - 1, lo + int(part.argmin()), lo + int(part.argmax())}))
    return kept


def metric_series(rows: Iterable[Sequence[Any]], points: int) -> list[dict[str, Any]]:
    """One curve per (scope, metric name), each downsampled to at most ``points`` points of
    ``[id, epoch, step, value]``; reports without a value for a name (or a null one) are gaps."""
    rows = rows if isinstance(rows, list) else list(rows)
    # Only row positions and values are collected; points are built for the kept indices alone.
    curves: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
    for position, row in enumerate(rows):
        values = row[5]
        if not values:
            continue
        scope = row[2]
        for name, value in values.items():
            if value is None:
                continue
            curve = curves.get((scope, name))
            if curve is None:
                curve = curves[scope, name] = ([], [])
            curve[0].append(position)
            curve[1].append(value)
    series = []
    for (scope, name), (positions, ys) in curves.items():
        kept = [(rows[positions[i]], ys[i]) for i in downsample(ys, points)]
        series.append({"scope": scope, "name": name, "count": len(ys),
                       "points": [[row[0], row[3], row[4], value] for row, value in kept]})
    return series


def event(e: JobEvent) -> dict[str, Any]:
    """One job event."""
    return {"id": e.id, "at": iso(e.at), "kind": e.kind, "from": e.from_state, "to": e.to_state,
            "attempt": e.attempt, "message": e.message}


def dataset(d: Dataset) -> dict[str, Any]:
    """An uploaded dataset with its inferred schema."""
    return {"id": f"dataset:{d.id}", "builtin": False, "name": d.name, "format": d.format, "rows": d.num_rows,
            "size_bytes": d.size_bytes, "sha256": d.sha256, "schema": d.schema, "created_at": iso(d.created_at)}
