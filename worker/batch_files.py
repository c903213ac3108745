"""Batch-file predictions: an uploaded dataset predicted in chunks into a JSONL file in storage.

Each output line is ``{"row": i, "prediction": ...}`` or ``{"row": i, "error": "..."}`` for input
row ``i``. A chunk is appended and fsynced, then its row count, byte size and failure count are
committed as an ``output_committed`` event in a fenced transaction (with the progress), before
the next chunk starts. A later attempt (the worker was killed) truncates whatever lies past the
last committed size and continues after the last committed row: every row appears exactly once.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from app import storage
from app.jobs import attempts, states
from app.jobs.errors import UserError
from app.jobs.schemas import PredictSpec
from app.models import Dataset, JobEvent, ModelVersion
from app.settings import Settings
from worker import failpoints

log = logging.getLogger(__name__)

COMMITTED = "output_committed"


def output_path(job_id: int) -> str:
    """Where a job's prediction file lives, relative to the storage root."""
    return f"jobs/{job_id}/predictions.jsonl"


@dataclass
class Plan:
    """A batch file's input, the model signature that maps columns to inputs, and where the output stands."""

    path: Path
    format: str
    signature: dict
    rows: int = 0
    bytes: int = 0
    failed: int = 0


def locate(session, job, prepared, settings: Settings) -> None:
    """Before the claim: find the upload, the model's signature and the last committed chunk."""
    dataset_id = int(prepared.spec.dataset.split(":", 1)[1])
    ds = session.execute(select(Dataset.path, Dataset.format).where(
        Dataset.id == dataset_id, Dataset.owner_id == job.owner_id)).one_or_none()
    if ds is None:
        raise UserError(f"dataset {prepared.spec.dataset} no longer exists")
    signature = session.get(ModelVersion, job.model_version_id).signature
    plan = Plan(storage.resolve(settings.storage_root, ds.path), ds.format, signature)
    # Only a fenced transaction writes this event, so it is the newest chunk a live attempt committed.
    last = session.execute(select(JobEvent.data).where(JobEvent.job_id == job.id, JobEvent.kind == COMMITTED)
                           .order_by(JobEvent.id.desc()).limit(1)).scalar_one_or_none()
    if last:
        plan.rows, plan.bytes, plan.failed = int(last["rows"]), int(last["bytes"]), int(last["failed"])
    prepared.batch_file = plan


def input_rows(frame, signature: dict) -> list:
    """The model's inputs from a frame's columns: a text per row, or the feature columns as numbers."""
    kind = signature.get("input_kind")
    names = list(signature.get("feature_names") or [])
    if kind == "sequence":
        raise UserError("a forecasting model takes windows of past values; send them as inputs, not as a dataset")
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise UserError(f"the dataset lacks the column(s) the model reads: {', '.join(missing)}")
    if kind == "tokens":
        return [None if v is None else str(v) for v in frame[names[0]].tolist()]
    # Missing or non-numeric cells pass through as they are: that row gets its own error.
    return [[_cell(v) for v in row] for row in frame[names].itertuples(index=False, name=None)]


def _cell(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def run(spec: PredictSpec, prepared, recorder, settings: Settings, *, load) -> str:
    """Predict every row of the upload, chunk by chunk, resuming after the last committed chunk."""
    from worker.ml import datasets, prediction
    from worker.runner import _finite, _stopped

    plan: Plan = prepared.batch_file
    model_ref, _, digest = prepared.model
    rows = input_rows(datasets.read_upload(plan.path, plan.format), plan.signature)
    total = len(rows)
    relative = output_path(recorder.job_id)
    out = storage.resolve(settings.storage_root, relative)
    out.parent.mkdir(parents=True, exist_ok=True)
    done, size, failed = plan.rows, plan.bytes, plan.failed
    with open(out, "ab") as f:
        if f.tell() < size:
            raise RuntimeError(f"the output file has {f.tell()} bytes, fewer than the {size} committed")
        f.truncate(size)  # a chunk appended but never committed (the worker died) is dropped
    if done:
        log.info("event=batch_file_resumed job_id=%s attempt=%s rows=%s", recorder.job_id, recorder.token, done)
    step = settings.predict_chunk_rows
    while done < total:
        if (reason := recorder.stop_reason()) is not None:
            return _stopped(recorder.job_id, recorder, reason)
        chunk = rows[done:done + step]
        results = prediction.predict_rows(load, chunk, device="auto", digest=digest)
        lines = "".join(json.dumps(_finite({"row": done + i, **r}), separators=(",", ":")) + "\n"
                        for i, r in enumerate(results)).encode()
        with open(out, "ab") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        size, done = size + len(lines), done + len(chunk)
        failed += sum(1 for r in results if "error" in r)
        recorder.on_progress(0, done, done / total)
        with recorder.transaction(f"output chunk up to row {done}") as session:
            attempts.record_event(session=session, job_id=recorder.job_id, token=recorder.token, kind=COMMITTED,
                                  message=f"{done} of {total} rows written",
                                  data={"rows": done, "bytes": size, "failed": failed})
        failpoints.chunk_pause()
    with recorder.final("finish") as session:
        attempts.finish(
            session=session, job_id=recorder.job_id, token=recorder.token, to=states.SUCCEEDED,
            result={"model": model_ref, "dataset": spec.dataset, "rows": total, "rows_succeeded": total - failed,
                    "rows_failed": failed, "output": {"format": "jsonl", "bytes": size}},
            message=f"predicted {total} rows of {spec.dataset} with {model_ref} ({failed} failed)",
        )
    return states.SUCCEEDED
