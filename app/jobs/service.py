"""Job services the web calls: submit, read, list, cancel, retry. The caller commits, then publishes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Row, func, select, update
from sqlalchemy.orm import Session

from app import catalog, model_registry, task_rules
from app.jobs import states
from app.jobs.errors import Conflict, NotFound, SpecError
from app.jobs.schemas import ARCHITECTURES, DatasetRef, PredictSpec, TrainSpec
from app.models import MAX_ID, Checkpoint, Dataset, Job, JobEvent, Metric, ModelVersion, User, utcnow
from app.settings import PREDICT_QUEUE, TRAIN_QUEUE, Settings


# What a job list shows, read as plain rows (no spec or result JSON, no ORM identity map);
# ``updated_at`` is the row's version for the list's ETag.
SUMMARY_COLUMNS = (
    Job.id, Job.kind, Job.name, Job.state, Job.progress, Job.epoch, Job.attempts, Job.created_at,
    Job.started_at, Job.finished_at, Job.error_class, Job.error_message, Job.updated_at,
)
# What one job's page shows (everything but the lease and scheduling bookkeeping).
DETAIL_COLUMNS = SUMMARY_COLUMNS + (
    Job.queue, Job.priority, Job.max_attempts, Job.step, Job.queued_at, Job.cancel_requested_at,
    Job.pause_requested_at, Job.resumed_from_epoch, Job.model_version_id, Job.init_model_version_id,
    Job.result, Job.spec,
)


def _visible(stmt, user: User):
    return stmt if user.is_admin else stmt.where(Job.owner_id == user.id)


def get_job(*, session: Session, user: User, job_id: int) -> Job:
    """The job, if ``user`` may see it; another user's job is NotFound like a missing one."""
    job = session.execute(_visible(select(Job).where(Job.id == job_id), user)).scalar_one_or_none()
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def read_job(*, session: Session, user: User, job_id: int) -> Row:
    """The columns a job's page shows, as a plain row; NotFound like :func:`get_job`."""
    row = session.execute(_visible(select(*DETAIL_COLUMNS).where(Job.id == job_id), user)).one_or_none()
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return row


def job_version(*, session: Session, user: User, job_id: int) -> tuple:
    """A cheap version of everything a job's page shows: its ``updated_at`` (every job write,
    lease renewals included, stamps it), its newest metric and its checkpoints (retention may
    delete one). NotFound like :func:`get_job`."""
    newest_metric = select(func.max(Metric.id)).where(Metric.job_id == Job.id).scalar_subquery()
    checkpoints = select(func.count(Checkpoint.id)).where(Checkpoint.job_id == Job.id).scalar_subquery()
    newest_checkpoint = select(func.max(Checkpoint.id)).where(Checkpoint.job_id == Job.id).scalar_subquery()
    row = session.execute(
        _visible(select(Job.updated_at, newest_metric, checkpoints, newest_checkpoint).where(Job.id == job_id), user)
    ).one_or_none()
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return tuple(row)


def metrics_version(*, session: Session, user: User, job_id: int, scope: str | None = None) -> int | None:
    """The newest metric id of a job (metrics are append-only, so it versions any page of them);
    NotFound like :func:`get_job`."""
    newest = select(func.max(Metric.id)).where(Metric.job_id == Job.id)
    if scope:
        newest = newest.where(Metric.scope == scope)
    row = session.execute(_visible(select(Job.id, newest.scalar_subquery()).where(Job.id == job_id), user)).one_or_none()
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return row[1]


def list_jobs(
    *, session: Session, user: User, limit: int = 50, before_id: int | None = None,
    state: str | None = None, kind: str | None = None,
) -> tuple[list[Row], int | None]:
    """The caller's jobs, newest first, as rows of :data:`SUMMARY_COLUMNS`; returns the page and
    the cursor of the next page."""
    stmt = _visible(select(*SUMMARY_COLUMNS), user).order_by(Job.id.desc()).limit(limit + 1)
    if before_id is not None:
        stmt = stmt.where(Job.id < before_id)
    if state:
        stmt = stmt.where(Job.state == state)
    if kind:
        stmt = stmt.where(Job.kind == kind)
    jobs = list(session.execute(stmt))
    next_cursor = jobs[limit - 1].id if len(jobs) > limit else None
    return jobs[:limit], next_cursor


def _small_int(text: str) -> int | None:
    """``text`` as an id-sized integer if it is plain ASCII digits, else None ("²" and "٣" are not)."""
    if not (text.isascii() and text.isdecimal()):
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _model_owner(session: Session, user: User, qualifier: str, field: str) -> User:
    """The user named by an ``owner/`` prefix (an id or an email); only admins may name someone else."""
    user_id = _small_int(qualifier)
    if user_id == user.id or qualifier.strip().lower() == user.email:
        return user
    if not user.is_admin:
        # Said the same whether or not that user exists, so the answer reveals nobody.
        raise SpecError.at(field, f"{qualifier!r} is not you; name your own models without an owner prefix")
    stmt = select(User).where(User.id == user_id) if user_id is not None else (
        select(User).where(User.email == qualifier.strip().lower()))
    owner = session.execute(stmt).scalar_one_or_none()
    if owner is None:
        raise SpecError.at(field, f"no user {qualifier!r} (an owner is a user id or email)")
    return owner


def resolve_model(*, session: Session, user: User, ref: str, field: str = "model") -> ModelVersion:
    """Find a model version by training job id, or by ``[owner/]name[@latest|@<version>|@<alias>]``.

    A name belongs to its owner: without a prefix it is looked up among ``user``'s own models,
    admins included; an admin names another user's model as ``owner/name`` (owner: id or email).
    A deleted version resolves to nothing (``@latest`` skips it); naming it is a SpecError.
    """
    job_id = _small_int(ref)
    deleted = None
    if job_id is not None:
        stmt = select(ModelVersion).where(ModelVersion.job_id == job_id)
        if not user.is_admin:
            stmt = stmt.where(ModelVersion.owner_id == user.id)
    else:
        if ref.isdecimal():
            raise SpecError.at(field, f"{ref!r} is not a training job id (ids are ASCII digits, at most {MAX_ID})")
        # A name holds neither "/" nor "@", but an email owner holds "@" (and may hold "/"):
        # the last "/" ends the owner, then the first "@" starts the version.
        qualifier, slash, rest = ref.rpartition("/")
        owner = _model_owner(session, user, qualifier, field) if slash else user
        name, at, version = rest.partition("@")
        stmt = select(ModelVersion).where(ModelVersion.owner_id == owner.id, ModelVersion.name == name)
        if at and version != "latest":
            number = _small_int(version)
            if number is None:
                if version.isdecimal() or not model_registry.ALIAS_PATTERN.match(version):
                    raise SpecError.at(field, f"version must be a number, 'latest' or an alias, not {version!r}")
                model = model_registry.resolve_alias(session=session, owner=owner, name=name, alias=version)
                if model is None:
                    raise SpecError.at(field, f"model {name!r} has no alias {version!r}")
                return model
            stmt = stmt.where(ModelVersion.version == number)
            deleted = stmt.where(ModelVersion.deleted_at.is_not(None))
    model = session.execute(stmt.where(ModelVersion.deleted_at.is_(None))
                            .order_by(ModelVersion.version.desc()).limit(1)).scalar_one_or_none()
    if model is None:
        if deleted is not None and session.execute(deleted).first() is not None:
            raise SpecError.at(field, f"model {ref!r} was deleted; name another version")
        raise SpecError.at(
            field, f"no trained model {ref!r} (a succeeded training job id, or name@latest, name@<version>, name@<alias>)"
        )
    return model


def _check_builtin(ds: DatasetRef) -> str:
    """Check a spec's use of a built-in dataset; returns the task."""
    meta = catalog.builtin(ds.id)
    if meta is None:
        known = ", ".join(f"builtin:{n}" for n in catalog.BUILTIN_DATASETS)
        raise SpecError.at("dataset.id", f"unknown dataset {ds.id!r}; built-in datasets are {known}")
    task = ds.task or meta.task
    columns = set(meta.columns) | ({meta.target} if meta.target else set())
    if ds.target is not None and meta.target is not None and ds.target not in columns:
        raise SpecError.at("dataset.target", f"{ds.target!r} is not a column of {ds.id} (target is {meta.target!r})")
    if task != meta.task:
        raise SpecError.at("dataset.task", f"{ds.id} is a {meta.task} dataset, not {task}")
    if ds.text_column is not None:
        raise SpecError.at("dataset.text_column", f"{ds.id} has no text column")
    if ds.window is not None and task != catalog.FORECASTING:
        raise SpecError.at("dataset.window", f"window applies to forecasting; {ds.id} is a {task} dataset")
    if ds.features is not None and task == catalog.FORECASTING:
        raise SpecError.at("dataset.features", "forecasting uses the target series alone; drop dataset.features")
    if task == catalog.FORECASTING:
        window = task_rules.forecast_window(ds.window, meta.default_window)
        if window + ds.horizon >= meta.num_rows // 2:
            raise SpecError.at("dataset.window", f"window {window} + horizon {ds.horizon} is too long for {meta.num_rows} rows")
    return task


def _check_upload(session: Session, user: User, ds: DatasetRef) -> str:
    """Check a spec's use of an uploaded dataset against its stored schema; returns the task."""
    dataset = session.execute(
        select(Dataset).where(Dataset.id == int(ds.id.split(":", 1)[1]), Dataset.owner_id == user.id)
    ).scalar_one_or_none()
    if dataset is None:
        raise SpecError.at("dataset.id", f"no dataset {ds.id!r}")
    columns = {c["name"]: c for c in dataset.schema.get("columns", [])}
    for field, name in (("dataset.target", ds.target), ("dataset.text_column", ds.text_column)):
        if name is not None and name not in columns:
            raise SpecError.at(field, f"{name!r} is not a column of {ds.id} (columns: {', '.join(columns)})")
    for i, name in enumerate(ds.features or []):
        if name not in columns:
            raise SpecError.at(f"dataset.features[{i}]", f"{name!r} is not a column of {ds.id}")
        if not columns[name].get("numeric", False):
            raise SpecError.at(f"dataset.features[{i}]", f"column {name!r} is not numeric")
    if ds.target is None and ds.task != catalog.FORECASTING:
        raise SpecError.at("dataset.target", "an uploaded dataset needs a target column")
    task = ds.task or task_rules.infer_task(text_column=ds.text_column, window=ds.window,
                                            target=columns.get(ds.target) if ds.target is not None else None)
    if task == catalog.TEXT_CLASSIFICATION and ds.text_column is None:
        raise SpecError.at("dataset.text_column", "text classification needs a text column")
    if task in (catalog.CLASSIFICATION, catalog.TEXT_CLASSIFICATION) and ds.target is not None:
        if columns[ds.target]["distinct"] < 2:
            raise SpecError.at("dataset.target", f"target {ds.target!r} has a single class; a classifier needs two or more")
    if task in (catalog.REGRESSION, catalog.FORECASTING) and ds.target is not None and not columns[ds.target]["numeric"]:
        raise SpecError.at("dataset.target", f"target {ds.target!r} is not numeric, so it cannot be a {task} target")
    window = task_rules.forecast_window(ds.window)
    if task == catalog.FORECASTING and window + ds.horizon >= dataset.num_rows:
        raise SpecError.at("dataset.window", f"{dataset.num_rows} rows are too few for window {window} and horizon {ds.horizon}")
    return task


def check_dataset(*, session: Session, user: User, dataset: DatasetRef) -> str:
    """Check a spec's dataset reference against the catalog or the upload's stored schema; returns the task."""
    if dataset.id.startswith(catalog.BUILTIN_PREFIX):
        return _check_builtin(dataset)
    return _check_upload(session, user, dataset)


def _check_train(session: Session, user: User, spec: TrainSpec) -> ModelVersion | None:
    """Check a training spec's cross-references; returns the model version to start from, if any."""
    ds = spec.dataset
    task = check_dataset(session=session, user=user, dataset=ds)
    if task == catalog.TEXT_CLASSIFICATION and spec.model.arch == "cnn1d" and spec.model.kernel_size > ds.max_tokens:
        raise SpecError.at("model.kernel_size", "kernel_size is longer than dataset.max_tokens")
    if spec.resources.gpus > 1:
        # Kept in the schema for the DDP launcher to come; until then, say so rather than use one GPU.
        raise SpecError.at("resources.gpus", "multi-GPU (DDP) training is not available yet; use 1")
    if spec.init_from is not None:
        base = resolve_model(session=session, user=user, ref=spec.init_from, field="init_from")
        if base.arch != spec.model.arch:
            raise SpecError.at("init_from", f"model {spec.init_from!r} is a {base.arch}, not a {spec.model.arch}")
        return base
    return None


# Which explanation methods each architecture supports (decided from the version's row: no torch here).
EXPLAIN_METHODS = {arch: ("integrated_gradients",) for arch in ARCHITECTURES} | {
    "transformer": ("integrated_gradients", "attention"),
}


def _check_predict(session: Session, user: User, spec: PredictSpec) -> ModelVersion:
    model = resolve_model(session=session, user=user, ref=spec.model)
    ref = f"{model.name}@{model.version}"
    model_registry.check_inputs(schema=model_registry.schema_of(model), inputs=list(spec.inputs), ref=ref)
    explanation = spec.explanation
    if explanation is not None and explanation.method not in EXPLAIN_METHODS.get(model.arch, ()):
        supported = ", ".join(EXPLAIN_METHODS.get(model.arch, ())) or "none"
        raise SpecError.at("explain.method", f"model {ref} is a {model.arch}, which cannot explain with "
                                             f"{explanation.method!r} (supported: {supported}); attention maps "
                                             "exist only for transformers")
    return model


def submit(
    *, session: Session, owner: User, spec: TrainSpec | PredictSpec, settings: Settings,
    published_at: datetime | None = None,
) -> Job:
    """Validate cross-references and insert the job as queued (the caller commits, then publishes).

    A caller that publishes right after the commit passes ``published_at`` (now), so the submit
    is one write transaction; if that publish never happens (a crash), the reconciler republishes
    the job once ``published_at`` is older than ``requeue_after_seconds``."""
    model_version_id = init_model_version_id = None
    if isinstance(spec, TrainSpec):
        # Pinned here, so "name@latest" means the version the person saw at submit, not a newer one.
        base = _check_train(session, owner, spec)
        init_model_version_id = base.id if base is not None else None
        queue, name = TRAIN_QUEUE, spec.name
    else:
        model = _check_predict(session, owner, spec)
        model_version_id = model.id
        queue, name = PREDICT_QUEUE, spec.name or f"predict-{model.name}"
    job = Job(
        owner_id=owner.id, kind=spec.kind, name=name, state=states.QUEUED, queue=queue,
        priority=spec.priority, spec=spec.model_dump(mode="json"),
        max_attempts=spec.max_attempts or settings.max_attempts, model_version_id=model_version_id,
        published_at=published_at,
        init_model_version_id=init_model_version_id,
    )
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, kind="submitted", to_state=states.QUEUED, message=f"{spec.kind} job submitted"))
    session.flush()
    return job


def mark_published(*, session: Session, job_id: int, at: datetime | None = None) -> None:
    """Remember when the wake-up message went out (the reconciler republishes lost ones)."""
    session.execute(update(Job).where(Job.id == job_id).values(published_at=at or utcnow()))


def mark_unpublished(*, session: Session, job_id: int) -> None:
    """Forget a publish that failed, so the reconciler republishes the job at its next pass."""
    session.execute(update(Job).where(Job.id == job_id, Job.state == states.QUEUED).values(published_at=None))


def cancel(*, session: Session, user: User, job_id: int) -> Job:
    """Persist a cancel request; a queued or paused job is cancelled at once, a running one at its next step."""
    job = get_job(session=session, user=user, job_id=job_id)
    if job.state in states.TERMINAL:
        raise Conflict(f"job {job_id} is already {job.state}")
    if job.cancel_requested_at is None:
        job.cancel_requested_at = utcnow()
        session.flush()
    states.transition(
        session, job_id, to=states.CANCELLED, expect=(states.QUEUED, states.PAUSED),
        values={"error_class": None}, message="cancelled before it ran",
    )
    session.refresh(job)
    return job


def pause(*, session: Session, user: User, job_id: int) -> Job:
    """Pause a job: a queued one at once; a running one checkpoints at its next step and frees its worker."""
    job = get_job(session=session, user=user, job_id=job_id)
    if job.state not in (states.QUEUED, states.RUNNING):
        raise Conflict(f"only queued or running jobs can be paused; job {job_id} is {job.state}")
    if job.kind != "train":
        raise Conflict("only training jobs can be paused")
    if job.pause_requested_at is None:
        job.pause_requested_at = utcnow()
        session.flush()
    states.transition(session, job_id, to=states.PAUSED, expect=states.QUEUED, message="paused before it ran")
    session.refresh(job)
    return job


def resume(*, session: Session, user: User, job_id: int) -> Job:
    """Queue a paused job again; it continues from its newest valid checkpoint."""
    job = get_job(session=session, user=user, job_id=job_id)
    ok = states.transition(
        session, job_id, to=states.QUEUED, expect=states.PAUSED,
        values={"pause_requested_at": None, "published_at": None, "not_before": None},
        event="resume", message="resumed by user",
    )
    if not ok:
        raise Conflict(f"only paused jobs can be resumed; job {job_id} is {job.state}")
    session.refresh(job)
    return job


def retry(*, session: Session, user: User, job_id: int, settings: Settings) -> Job:
    """Queue a failed or cancelled job again; it resumes from its newest valid checkpoint."""
    job = get_job(session=session, user=user, job_id=job_id)
    if job.state not in (states.FAILED, states.CANCELLED):
        raise Conflict(f"only failed or cancelled jobs can be retried; job {job_id} is {job.state}")
    budget = job.spec.get("max_attempts") or settings.max_attempts
    ok = states.transition(
        session, job_id, to=states.QUEUED, expect=(states.FAILED, states.CANCELLED),
        values={
            "max_attempts": job.attempts + budget, "cancel_requested_at": None, "pause_requested_at": None,
            "error_class": None,
            "error_message": None, "published_at": None, "not_before": None,
        },
        event="retry", message="retried by user",
    )
    if not ok:
        raise Conflict(f"job {job_id} changed state; try again")
    session.refresh(job)
    return job


def list_model_versions(*, session: Session, user: User, limit: int = 500) -> list[ModelVersion]:
    """The user's own registered model versions (what a prediction may name as ``name@N``), newest first."""
    stmt = select(ModelVersion).where(ModelVersion.owner_id == user.id, ModelVersion.deleted_at.is_(None))
    return list(session.execute(stmt.order_by(ModelVersion.id.desc()).limit(limit)).scalars())


def count_by_state(*, session: Session) -> dict[str, int]:
    """How many jobs are in each state (for /metrics)."""
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {state: n for state, n in rows}



def list_events(*, session: Session, user: User, job_id: int) -> list[JobEvent]:
    """The job's events in order; tracebacks only for admins (they may name paths and hosts)."""
    get_job(session=session, user=user, job_id=job_id)
    stmt = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
    if not user.is_admin:
        stmt = stmt.where(JobEvent.kind != "traceback")
    return list(session.execute(stmt).scalars())
