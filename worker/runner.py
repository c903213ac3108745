"""One job's run: claim, resume, train or predict through the recorder, finish. No Celery here."""

from __future__ import annotations

import logging
import math
import os
import socket
import traceback

from sqlalchemy import select

from app import storage
from app.db import session_scope
from app.jobs import attempts, recovery, states
from app.jobs.errors import JobFailure, JobTimeout, SpecError, StaleAttempt, UserError
from app.jobs.schemas import PredictSpec, TrainSpec, parse_spec
from app.logs import bind_job
from app.models import Checkpoint, Dataset, Job, ModelVersion, utcnow
from app.settings import Settings
from worker import failpoints
from worker.recorder import Recorder

log = logging.getLogger(__name__)

# Recorders of the attempts running in this process, and whether it is shutting down (SIGTERM):
# running jobs then checkpoint and go back to the queue.
_active: set[Recorder] = set()
_shutting_down = False


def request_shutdown() -> None:
    """Make every running job of this process stop at its next step and return to the queue."""
    global _shutting_down
    _shutting_down = True
    for recorder in list(_active):
        recorder.request_stop("shutdown")


def run(job_id: int, token: int, *, worker: str, settings: Settings) -> str:
    """Run one attempt of ``job_id`` if it is claimable with ``token``; returns what happened."""
    with session_scope(settings.database_url) as session:
        attempt = attempts.claim(
            session=session, job_id=job_id, token=token, worker=worker, host=socket.gethostname(),
            pid=os.getpid(), lease_seconds=settings.lease_seconds,
        )
        if attempt is None:
            log.info("event=dropped job_id=%s token=%s reason=not_claimable", job_id, token)
            return "dropped"
        raw_spec = session.get(Job, job_id).spec
        number, owner = attempt.number, attempts.lease_owner(attempt)
    with bind_job(job_id, number):
        log.info("event=claimed job_id=%s attempt=%s worker=%s", job_id, number, worker)
        try:
            spec = parse_spec(raw_spec)
        except SpecError as exc:  # a spec stored by an older release that this one no longer accepts
            return _fail(job_id, number, settings, "user_error", f"the stored spec is no longer valid: {exc}",
                         retryable=False)
        return _run_claimed(job_id, number, owner, spec, settings=settings)


def _run_claimed(job_id: int, number: int, owner: str, spec: TrainSpec | PredictSpec, *,
                 settings: Settings) -> str:
    """Run a claimed attempt to its end, classifying any failure."""
    recorder = Recorder(
        job_id=job_id, token=number, owner=owner, settings=settings,
        keep_last=spec.checkpoint.keep_last if isinstance(spec, TrainSpec) else 1,
        max_attempt_runtime_s=spec.max_attempt_runtime_s,
    ).start()
    _active.add(recorder)
    if _shutting_down:
        recorder.request_stop("shutdown")
    try:
        if isinstance(spec, TrainSpec):
            return _train(job_id, spec, recorder, settings)
        return _predict(job_id, spec, recorder, settings)
    except StaleAttempt as exc:
        log.warning("event=stale_attempt job_id=%s attempt=%s detail=%s", job_id, number, exc)
        return "stale"
    except JobFailure as exc:
        return _fail(job_id, number, settings, exc.failure_class, exc.message, retryable=exc.retryable)
    except Exception as exc:  # noqa: BLE001 - classified as internal; traceback to the log, not the API
        log.error("event=internal_error job_id=%s attempt=%s\n%s", job_id, number, traceback.format_exc())
        message = f"internal error ({type(exc).__name__}); operators can find the traceback in the job's log"
        return _fail(job_id, number, settings, "internal", message, retryable=True, detail=traceback.format_exc())
    finally:
        _active.discard(recorder)
        recorder.close()


def _fail(job_id: int, token: int, settings: Settings, error_class: str, message: str, *, retryable: bool,
          detail: str | None = None) -> str:
    try:
        with session_scope(settings.database_url) as session:
            if detail:
                attempts.record_event(session=session, job_id=job_id, token=token, kind="traceback",
                                      message=message, data={"traceback": detail})
            job = session.get(Job, job_id, populate_existing=True)
            if job.attempts != token or job.state != states.RUNNING:
                raise StaleAttempt(f"job {job_id}: attempt {token} may no longer finish it")
            new_state = recovery.requeue_or_fail(
                session=session, job=job, error_class=error_class, message=message, now=utcnow(), retryable=retryable
            )
    except StaleAttempt:
        return "stale"
    log.info("event=failed job_id=%s attempt=%s class=%s state=%s", job_id, token, error_class, new_state)
    return new_state


def _load_resume(job_id: int, token: int, settings: Settings) -> tuple[bytes | None, int, int]:
    """Bytes, epoch and step of the newest checkpoint that verifies and parses (older ones as fallback)."""
    from worker.ml import checkpoints

    with session_scope(settings.database_url) as session:
        rows = attempts.checkpoints_newest_first(session=session, job_id=job_id)
        candidates = [(c.id, c.path, c.sha256, c.epoch, c.step) for c in rows]
    for ckpt_id, path, digest, epoch, step in candidates:
        try:
            data = storage.read_verified(settings.storage_root, path, digest)
            checkpoints.check(data)
            return data, epoch, step
        except (OSError, storage.StorageError, checkpoints.UnreadableCheckpoint) as exc:
            log.warning("event=checkpoint_unusable job_id=%s checkpoint=%s error=%s", job_id, ckpt_id, exc)
            with session_scope(settings.database_url) as session:
                attempts.record_event(session=session, job_id=job_id, token=token, kind="checkpoint_skipped",
                                      message=f"checkpoint at epoch {epoch} is unusable ({exc}); trying an older one")
    return None, 0, 0


def _model_checkpoint(session, model: ModelVersion, settings: Settings) -> bytes:
    """A model version's checkpoint bytes, verified and parsable; a bad one is the user's (never retried)."""
    from worker.ml import checkpoints

    ckpt = session.get(Checkpoint, model.checkpoint_id)
    try:
        data = storage.read_verified(settings.storage_root, ckpt.path, ckpt.sha256)
        checkpoints.check(data)
    except (OSError, storage.StorageError, checkpoints.UnreadableCheckpoint) as exc:
        raise UserError(f"model {model.name}@{model.version} cannot be loaded: {exc}; "
                        "train it again or use another version") from None
    return data


def _train(job_id: int, spec: TrainSpec, recorder: Recorder, settings: Settings) -> str:
    from worker.ml import training

    failpoints.check_job(spec.name)
    resume, resume_epoch, resume_step = _load_resume(job_id, recorder.token, settings)
    init_from = dataset_file = dataset_format = None
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if resume is None and spec.init_from:
            init_from = _model_checkpoint(session, _pinned_base(session, job, spec.init_from), settings)
        if spec.dataset.id.startswith("dataset:"):
            ds = session.execute(select(Dataset).where(
                Dataset.id == int(spec.dataset.id.split(":", 1)[1]), Dataset.owner_id == job.owner_id)).scalar_one_or_none()
            if ds is None:
                raise UserError(f"dataset {spec.dataset.id} no longer exists")
            dataset_file, dataset_format = storage.resolve(settings.storage_root, ds.path), ds.format
        attempts.mark_start(session=session, job_id=job_id, token=recorder.token, owner=recorder.owner,
                            lease_seconds=settings.lease_seconds, epoch=resume_epoch, step=resume_step,
                            resumed=resume is not None)
    result = training.train(
        spec, hooks=recorder, dataset_file=dataset_file, dataset_format=dataset_format,
        resume=resume, init_from=init_from, device=spec.resources.device,
    )
    if result.stopped:
        return _stopped(job_id, recorder, result.stopped, settings)
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        best_id = recorder.best_checkpoint_id or recorder.last_checkpoint_id
        best = session.get(Checkpoint, best_id) if best_id else None
        if best is None:
            best = session.execute(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                   .order_by(Checkpoint.is_best.desc(), Checkpoint.step.desc()).limit(1)).scalar_one()
        final, tested = _finite(result.final_metrics), _finite(result.test_metrics)
        metrics = {**final, **tested}
        version = attempts.register_model_version(session=session, job=job, checkpoint=best,
                                                  signature=result.signature, metrics=metrics)
        attempts.finish(
            session=session, job_id=job_id, token=recorder.token, to=states.SUCCEEDED,
            result={
                "final_metrics": final, "test_metrics": tested, "best_epoch": result.best_epoch,
                "best_metric": _finite({result.best_metric_name: result.best_metric_value}),
                "epochs_completed": result.epochs_completed, "model": f"{version.name}@{version.version}",
                "parameters": result.signature.get("parameters"),
                "trainable_parameters": result.signature.get("trainable_parameters"),
            },
            message=f"trained {result.epochs_completed} epochs; registered {version.name}@{version.version}",
        )
    return states.SUCCEEDED


def _finite(value):
    """A result fit for JSON: an undefined number (NaN, infinity) anywhere inside becomes null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _stopped(job_id: int, recorder: Recorder, reason: str, settings: Settings) -> str:
    if reason == "stale":
        raise StaleAttempt(f"job {job_id}: lease lost")
    if reason == "timeout":
        raise JobTimeout(f"job {job_id} ran past its max_attempt_runtime_s; a checkpoint was saved, retry to continue")
    with session_scope(settings.database_url) as session:
        if reason == "cancel":
            attempts.finish(session=session, job_id=job_id, token=recorder.token, to=states.CANCELLED,
                            message="cancelled by request; checkpoint saved")
            return states.CANCELLED
        if reason == "pause":
            attempts.finish(session=session, job_id=job_id, token=recorder.token, to=states.PAUSED,
                            message="paused; checkpoint saved")
            return states.PAUSED
        # shutdown: back to the queue at once, without spending one of the job's attempts
        job = session.get(Job, job_id, populate_existing=True)
        attempts.finish(
            session=session, job_id=job_id, token=recorder.token, to=states.QUEUED,
            values={"published_at": None, "not_before": None, "max_attempts": job.max_attempts + 1},
            message="worker shutting down; checkpoint saved, job requeued",
        )
        return states.QUEUED


def _pinned_base(session, job: Job, ref: str) -> ModelVersion:
    """The exact model version ``init_from`` resolved to at submit (a newer ``@latest`` is ignored)."""
    model = session.get(ModelVersion, job.init_model_version_id) if job.init_model_version_id else None
    if model is None:
        raise UserError(f"the model version init_from {ref!r} was pinned to at submit no longer exists; "
                        "submit the job again to start from a current version")
    return model


def _predict(job_id: int, spec: PredictSpec, recorder: Recorder, settings: Settings) -> str:
    from worker.ml import prediction

    if spec.model.startswith("pretrained:"):
        # A catalog model as it ships: embeddings only (the spec refuses anything else).
        data, model_ref = None, spec.model
    else:
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            model = session.get(ModelVersion, job.model_version_id) if job.model_version_id else None
            if model is None:
                raise UserError(f"the model {spec.model!r} no longer exists")
            data = _model_checkpoint(session, model, settings)
            model_ref = f"{model.name}@{model.version}"
    output = prediction.predict(data, list(spec.inputs), device="cpu", output=spec.output,
                                compare_with=spec.compare_with, base=spec.model.partition(":")[2] or None)
    with session_scope(settings.database_url) as session:
        attempts.finish(session=session, job_id=job_id, token=recorder.token, to=states.SUCCEEDED,
                        result=_finite({"model": model_ref, **output}),
                        message=f"predicted {len(spec.inputs)} inputs with {model_ref}")
    return states.SUCCEEDED
