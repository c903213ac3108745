"""One job's run: claim, resume, train or predict through the recorder, finish. No Celery here."""

from __future__ import annotations

import logging
import math
import os
import socket
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import bindparam, select

from app import finish_signal, model_registry, storage
from app.catalog import GENERATIVE_TASKS
from app.db import get_engine, session_scope
from app.jobs import attempts, recovery, states
from app.jobs.errors import JobFailure, JobTimeout, SpecError, StaleAttempt, UserError
from app.jobs.schemas import PredictSpec, TrainSpec, parse_spec
from app.logs import bind_job
from app.models import Checkpoint, Dataset, Job, ModelVersion, utcnow
from app.settings import Settings
from app.usage import Tally
from worker import batch_files, failpoints, generation_job, micro_batch
from worker.recorder import Recorder

log = logging.getLogger(__name__)

# Recorders of the attempts running in this process, and whether it is shutting down (SIGTERM):
# running jobs then checkpoint and go back to the queue.
_active: set[Recorder] = set()
_shutting_down = False
# The newest attempt number this process claimed, by database and job (the most recent jobs only).
_claimed_here: OrderedDict[tuple[str, int], int] = OrderedDict()
CLAIMED_HERE_KEPT = 100_000


def note_claimed(settings: Settings, job_id: int, number: int) -> None:
    """Remember that this process claimed attempt ``number`` of ``job_id``: a message carrying an
    older token is then dropped without reading the database."""
    key = (settings.database_url, job_id)
    _claimed_here[key] = number
    _claimed_here.move_to_end(key)
    while len(_claimed_here) > CLAIMED_HERE_KEPT:
        _claimed_here.popitem(last=False)


def request_shutdown() -> None:
    """Make every running job of this process stop at its next step and return to the queue."""
    global _shutting_down
    _shutting_down = True
    for recorder in list(_active):
        recorder.request_stop("shutdown")


@dataclass
class _Prepared:
    """What a job needs before it starts, read and verified before the claim (no lock held)."""

    raw_spec: dict
    spec: TrainSpec | PredictSpec | None = None
    problem: JobFailure | None = None  # found before the claim; fails the attempt right after it
    resume: bytes | None = None
    start: tuple[int, int] | None = None
    skipped: list[str] = field(default_factory=list)
    init_from: bytes | None = None
    dataset_file: Path | None = None
    dataset_format: str | None = None
    model: tuple[str, str, str] | None = None  # prediction: model ref, checkpoint path, its sha256
    model_version_id: int | None = None  # prediction: the version other queued predictions batch with
    model_task: str | None = None  # prediction: the model's task (text generators run alone)
    batch_limits: tuple[int | None, int | None] = (None, None)  # prediction: the alias's or version's, if set
    worker: str = "worker"
    batch_file: object | None = None  # batch-file prediction: a worker.batch_files.Plan
    company: list[tuple] | None = None  # micro-batch: jobs claimed with the lead (micro_batch.take_company)


def run(job_id: int, token: int, *, worker: str, settings: Settings) -> str:
    """Run one attempt of ``job_id`` if it is claimable with ``token``; returns what happened.

    Everything the attempt needs is read (and its files verified) before the claim, so the claim
    and the record of where the attempt starts are one short write transaction.
    """
    if _claimed_here.get((settings.database_url, job_id), -1) > token:
        # This process claimed an attempt after ``token`` itself (a micro-batch took the job before
        # its message arrived): attempts only grow, so the job is not claimable with it.
        log.info("event=dropped job_id=%s token=%s reason=claimed_here", job_id, token)
        return "dropped"
    prepared = _prepare(job_id, token, settings) if _claimable(job_id, token, settings) else None
    if prepared is None:
        log.info("event=dropped job_id=%s token=%s reason=not_claimable", job_id, token)
        return "dropped"
    resumed = prepared.resume is not None
    tally = Tally()  # the usage totals of the lead's claim and its company's: one upsert
    with session_scope(settings.database_url, write=True) as session:
        attempt = attempts.claim(
            session=session, job_id=job_id, token=token, worker=worker, host=socket.gethostname(),
            pid=os.getpid(), lease_seconds=settings.lease_seconds, start=prepared.start, resumed=resumed,
            device=_device_kind(prepared.spec), tally=tally,
        )
        if attempt is not None:
            for message in prepared.skipped:
                attempts.record_event(session=session, job_id=job_id, token=attempt.number,
                                      kind="checkpoint_skipped", message=message)
            number, owner = attempt.number, attempts.lease_owner(attempt)
            if _batches(prepared):
                # The micro-batch's first look for company, in the same transaction: a lone
                # request costs no transaction of its own to find out it is alone.
                prepared.company = micro_batch.take_company(
                    session=session, lead_id=job_id, model_version_id=prepared.model_version_id,
                    limit=micro_batch.batch_size(settings, prepared.batch_limits[0]) - 1, worker=worker,
                    settings=settings, tally=tally)
        tally.apply(session=session)
    if attempt is None:
        log.info("event=dropped job_id=%s token=%s reason=not_claimable", job_id, token)
        return "dropped"
    note_claimed(settings, job_id, number)
    prepared.worker = worker
    with bind_job(job_id, number):
        log.info("event=claimed job_id=%s attempt=%s worker=%s", job_id, number, worker)
        try:
            if prepared.spec is None:
                return _fail(job_id, number, settings, None, prepared.problem.failure_class,
                             prepared.problem.message, retryable=prepared.problem.retryable)
            return _run_claimed(job_id, number, owner, prepared, settings=settings)
        finally:
            # After the attempt's last transaction committed: an inline request waiting on it wakes.
            finish_signal.notify_finished(settings, job_id)


def _batches(prepared: _Prepared) -> bool:
    """Whether the prediction runs in a micro-batch (:func:`_predict`'s last path)."""
    spec = prepared.spec
    return (isinstance(spec, PredictSpec) and prepared.problem is None and spec.dataset is None
            and spec.output != "embedding" and spec.explanation is None
            and prepared.model_task not in GENERATIVE_TASKS)


def _device_kind(spec: TrainSpec | PredictSpec | None) -> str | None:
    """The kind of device the attempt will run on (recorded for usage accounting)."""
    if spec is None:
        return None
    from worker.ml.devices import device_kind

    return device_kind(spec.resources.device if isinstance(spec, TrainSpec) else "auto")


# Built once (values bound): a drain reads it for every message, most of them duplicates it drops.
_CLAIMABLE_JOB = (
    select(Job, ModelVersion, Checkpoint)
    .outerjoin(ModelVersion, ModelVersion.id == Job.model_version_id)
    .outerjoin(Checkpoint, Checkpoint.id == ModelVersion.checkpoint_id)
    .where(Job.id == bindparam("job_id"), Job.state == states.QUEUED, Job.attempts == bindparam("token"))
)


# A drain's messages are mostly duplicates: the jobs a micro-batch of another process took before
# their own messages arrived. One narrow statement tells them apart, on a pooled driver connection
# (no session, no SQLAlchemy statement, no transaction: autocommit on PostgreSQL, and pysqlite
# opens none for a SELECT), without the ~60 columns of the job, its model and its checkpoint.
_STILL_CLAIMABLE = "SELECT 1 FROM jobs WHERE id = {p} AND state = 'queued' AND attempts = {p}"
_probes: dict[str, tuple[object, str, bool]] = {}


def _claimable(job_id: int, token: int, settings: Settings) -> bool:
    """Whether ``job_id`` is queued with ``token`` now (the claim's compare-and-set decides later;
    True when the probe itself failed, so that :func:`_prepare` and the claim decide)."""
    probe = _probes.get(settings.database_url)
    if probe is None:
        engine = get_engine(settings.database_url)
        marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        probe = _probes[settings.database_url] = (engine, _STILL_CLAIMABLE.format(p=marker),
                                                   engine.dialect.name == "postgresql")
    engine, sql, autocommit = probe
    try:
        conn = engine.raw_connection()
    except Exception:  # noqa: BLE001 - the full read reports a database that is down
        return True
    try:
        if autocommit:
            conn.driver_connection.autocommit = True
        cursor = conn.cursor()
        try:
            cursor.execute(sql, (job_id, token))
            return cursor.fetchone() is not None
        finally:
            cursor.close()
    except Exception as exc:  # noqa: BLE001 - a broken connection is dropped; the full read decides
        log.warning("event=claimable_probe_failed job_id=%s error=%r", job_id, exc)
        conn.invalidate()
        return True
    finally:
        if autocommit and conn.is_valid:
            conn.driver_connection.autocommit = False  # idle: no round trip
        conn.close()  # back to the pool


def _prepare(job_id: int, token: int, settings: Settings) -> _Prepared | None:
    """Read the job and what it refers to, then verify its files; None if it is not claimable."""
    with session_scope(settings.database_url) as session:
        # Reads only, each a statement of its own: without a transaction around them (PostgreSQL
        # reads at READ COMMITTED statement by statement anyway) they cost no BEGIN and COMMIT.
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        # One query for the job and a prediction's model version and checkpoint (the lookups
        # below find them in the session); a duplicate or stale message finds no row, loading none.
        found = session.execute(_CLAIMABLE_JOB, {"job_id": job_id, "token": token}).first()
        if found is None:
            return None
        job = found[0]
        prepared = _Prepared(raw_spec=job.spec)
        try:
            prepared.spec = parse_spec(job.spec)
        except SpecError as exc:  # a spec stored by an older release that this one no longer accepts
            prepared.problem = UserError(f"the stored spec is no longer valid: {exc}")
            return prepared
        except Exception as exc:  # noqa: BLE001 - a bug in parsing must end the job, not loop on redelivery
            log.error("event=spec_unreadable job_id=%s\n%s", job_id, traceback.format_exc())
            prepared.problem = JobFailure(f"internal error reading the stored spec ({type(exc).__name__})")
            prepared.problem.retryable = False
            return prepared
        try:
            if isinstance(prepared.spec, PredictSpec):
                if prepared.spec.model.startswith("pretrained:"):
                    return prepared  # a catalog model as it ships: nothing stored to read
                model = session.get(ModelVersion, job.model_version_id) if job.model_version_id else None
                if model is None:
                    raise UserError(f"the model {prepared.spec.model!r} no longer exists")
                ckpt = session.get(Checkpoint, model.checkpoint_id)
                if model.deleted_at is not None:
                    from worker.ml import prediction

                    prediction.evict(ckpt.sha256)  # a deleted version never serves from this process again
                    raise UserError(f"the model {prepared.spec.model!r} was deleted")
                prepared.model = (f"{model.name}@{model.version}", ckpt.path, ckpt.sha256)
                prepared.model_version_id = model.id
                prepared.model_task = model.task
                prepared.batch_limits = model_registry.batch_limits(session=session, model=model,
                                                                    ref=prepared.spec.model)
                if prepared.spec.dataset is not None:
                    batch_files.locate(session, job, prepared, settings)
                return prepared
            candidates = [(c.id, c.path, c.sha256, c.epoch, c.step)
                          for c in attempts.checkpoints_newest_first(session=session, job_id=job_id)]
            base = None
            if prepared.spec.init_from:
                model = _pinned_base(session, job, prepared.spec.init_from)
                ckpt = session.get(Checkpoint, model.checkpoint_id)
                base = (f"{model.name}@{model.version}", ckpt.path, ckpt.sha256)
            if prepared.spec.dataset.id.startswith("dataset:"):
                ds = session.execute(select(Dataset.path, Dataset.format).where(
                    Dataset.id == int(prepared.spec.dataset.id.split(":", 1)[1]),
                    Dataset.owner_id == job.owner_id)).one_or_none()
                if ds is None:
                    raise UserError(f"dataset {prepared.spec.dataset.id} no longer exists")
                prepared.dataset_file, prepared.dataset_format = storage.resolve(settings.storage_root, ds.path), ds.format
        except UserError as exc:
            prepared.problem = exc
            return prepared
    # Files are read with no transaction open. Checkpoint rows of a queued job cannot change
    # before the claim: only the attempt holding the lease writes them, and the claim checks the
    # token, so what was verified here is what the attempt starts from.
    prepared.resume, epoch, step = _load_resume(job_id, candidates, prepared.skipped, settings)
    prepared.start = (epoch, step)
    if prepared.resume is None and base is not None:
        try:
            prepared.init_from = model_checkpoint(base, settings)
        except UserError as exc:
            prepared.problem = exc
    return prepared


def _run_claimed(job_id: int, number: int, owner: str, prepared: _Prepared, *, settings: Settings) -> str:
    """Run a claimed attempt to its end, classifying any failure."""
    spec = prepared.spec
    recorder = Recorder(
        job_id=job_id, token=number, owner=owner, settings=settings,
        keep_last=spec.checkpoint.keep_last if isinstance(spec, TrainSpec) else 1,
        max_attempt_runtime_s=spec.max_attempt_runtime_s,
    ).start()
    _active.add(recorder)
    if _shutting_down:
        recorder.request_stop("shutdown")
    try:
        if prepared.problem is not None:
            raise prepared.problem
        if isinstance(spec, TrainSpec):
            return _train(job_id, spec, prepared, recorder)
        return _predict(spec, prepared, recorder, settings)
    except StaleAttempt as exc:
        log.warning("event=stale_attempt job_id=%s attempt=%s detail=%s", job_id, number, exc)
        return "stale"
    except JobFailure as exc:
        return _fail(job_id, number, settings, recorder, exc.failure_class, exc.message, retryable=exc.retryable)
    except Exception as exc:  # noqa: BLE001 - classified as internal; traceback to the log, not the API
        log.error("event=internal_error job_id=%s attempt=%s\n%s", job_id, number, traceback.format_exc())
        message = f"internal error ({type(exc).__name__}); operators can find the traceback in the job's log"
        return _fail(job_id, number, settings, recorder, "internal", message, retryable=True,
                     detail=traceback.format_exc())
    finally:
        _active.discard(recorder)
        recorder.close()


def _fail(job_id: int, token: int, settings: Settings, recorder: Recorder | None, error_class: str, message: str,
          *, retryable: bool, detail: str | None = None) -> str:
    """Requeue or fail the attempt in one transaction, after the metrics it had queued."""
    try:
        with (recorder.final(f"{error_class} failure") if recorder is not None
              else session_scope(settings.database_url, write=True)) as session:
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


def _load_resume(job_id: int, candidates: list[tuple], skipped: list[str],
                 settings: Settings) -> tuple[bytes | None, int, int]:
    """Bytes, epoch and step of the newest checkpoint that verifies and parses (older ones as fallback).

    Each unusable one adds a message to ``skipped`` (recorded as an event with the claim).
    """
    from worker.ml import checkpoints

    for ckpt_id, path, digest, epoch, step in candidates:
        try:
            data = storage.read_verified(settings.storage_root, path, digest)
            checkpoints.check(data)
            return data, epoch, step
        except (OSError, storage.StorageError, checkpoints.UnreadableCheckpoint) as exc:
            log.warning("event=checkpoint_unusable job_id=%s checkpoint=%s error=%s", job_id, ckpt_id, exc)
            skipped.append(f"checkpoint at epoch {epoch} is unusable ({exc}); trying an older one")
    return None, 0, 0


def model_checkpoint(model: tuple[str, str, str], settings: Settings) -> bytes:
    """A model version's checkpoint bytes, verified and parsable; a bad one is the user's (never retried)."""
    from worker.ml import checkpoints

    ref, path, digest = model
    try:
        data = storage.read_verified(settings.storage_root, path, digest)
        checkpoints.check(data)
    except (OSError, storage.StorageError, checkpoints.UnreadableCheckpoint) as exc:
        raise UserError(f"model {ref} cannot be loaded: {exc}; train it again or use another version") from None
    return data


def _train(job_id: int, spec: TrainSpec, prepared: _Prepared, recorder: Recorder) -> str:
    from worker.ml import training

    failpoints.check_job(spec.name)
    result = training.train(
        spec, hooks=recorder, dataset_file=prepared.dataset_file, dataset_format=prepared.dataset_format,
        resume=prepared.resume, init_from=prepared.init_from, device=spec.resources.device,
    )
    # The last periodic checkpoint may still be on the checkpoint thread: the model version and the
    # result name it, so it must be stored (or its failure fail the attempt) before they are.
    recorder.wait_for_checkpoint()
    if result.stopped:
        return _stopped(job_id, recorder, result.stopped)
    # One transaction: the last queued metrics, the model version, the result, the attempt's end.
    with recorder.final("finish") as session:
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


def _stopped(job_id: int, recorder: Recorder, reason: str) -> str:
    if reason == "stale":
        raise StaleAttempt(f"job {job_id}: lease lost")
    if reason == "timeout":
        raise JobTimeout(f"job {job_id} ran past its max_attempt_runtime_s; a checkpoint was saved, retry to continue")
    with recorder.final(f"stop ({reason})") as session:
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


def _predict(spec: PredictSpec, prepared: _Prepared, recorder: Recorder, settings: Settings) -> str:
    from worker.ml import prediction

    # The settings this job runs under bound the process's serving cache (cheap; evicts only on a change).
    prediction.configure_cache(models=settings.predict_cache_models, max_bytes=settings.predict_cache_bytes)

    def load() -> bytes:
        return model_checkpoint(prepared.model, settings)

    if spec.dataset is not None:
        return batch_files.run(spec, prepared, recorder, settings, load=load)
    if spec.output == "embedding" or spec.explanation is not None:
        return _alone(spec, prepared, recorder, settings, load=load)
    if prepared.model_task in GENERATIVE_TASKS:  # token by token, streamed: never in a micro-batch
        return generation_job.run(spec, prepared, recorder, settings, load=load,
                                  stopped=lambda reason: _stopped(recorder.job_id, recorder, reason))
    # Other queued predictions of the same model version join this one's forward pass, each
    # claimed and finished with its own token. A model served recently is in the process's cache
    # under its checkpoint's sha256: no file read, hash or parse.
    max_batch_size, max_delay_ms = prepared.batch_limits
    others = micro_batch.claim_more(lead_id=recorder.job_id, model_version_id=prepared.model_version_id,
                                    worker=prepared.worker, settings=settings, max_batch_size=max_batch_size,
                                    max_delay_ms=max_delay_ms, taken=prepared.company)
    for member in others:
        note_claimed(settings, member.job_id, member.recorder.token)
    lead = micro_batch.Member(recorder.job_id, spec, recorder)
    return micro_batch.run(lead, others, model=prepared.model, load=load, settings=settings, fail=fail_attempt)


def _alone(spec: PredictSpec, prepared: _Prepared, recorder: Recorder, settings: Settings, *, load) -> str:
    """A prediction that is not batched with others: sentence embeddings (of a pretrained model,
    fine-tuned or, ``pretrained:<name>``, as it ships), or predictions with explanations."""
    from worker.ml import prediction

    if prepared.model is None:  # a catalog model as it ships
        model_ref, checkpoint, digest = spec.model, None, None
    else:
        model_ref, _, digest = prepared.model
        checkpoint = load
    explanation = spec.explanation
    output = prediction.predict(checkpoint, list(spec.inputs), device="auto", digest=digest, output=spec.output,
                                compare_with=spec.compare_with, base=spec.model.partition(":")[2] or None,
                                explain=explanation.model_dump() if explanation is not None else None)
    with recorder.final("finish") as session:
        attempts.finish(session=session, job_id=recorder.job_id, token=recorder.token, to=states.SUCCEEDED,
                        result=_finite({"model": model_ref, **output}),
                        message=f"{'embedded' if spec.output == 'embedding' else 'predicted'} "
                                f"{len(spec.inputs)} inputs with {model_ref}")
    return states.SUCCEEDED


def fail_attempt(job_id: int, token: int, recorder: Recorder | None, error_class: str, message: str, *,
                 retryable: bool, detail: str | None = None) -> str:
    """End one claimed attempt with a classified failure (requeued or failed); returns its new state."""
    return _fail(job_id, token, recorder.settings, recorder, error_class, message, retryable=retryable,
                 detail=detail)
