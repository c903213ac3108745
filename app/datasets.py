"""Uploaded datasets: format detection, schema inference, storage, preview and deletion (pandas, no torch)."""

from __future__ import annotations

import io
import json
import uuid
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import catalog, images, storage, task_rules
from app.jobs.errors import Conflict, NotFound, SpecError
from app.jobs.states import TERMINAL
from app.models import Dataset, Job, User
from app.settings import Settings

FORMATS = {"csv": "csv", "jsonl": "jsonl", "ndjson": "jsonl", "parquet": "parquet", "zip": "zip"}
MAX_SAMPLE_VALUES = 5
PREVIEW_ROWS = 20
MAX_PREVIEW_ROWS = 200
# The schema (dtypes, distinct counts, samples) is inferred from this many first rows, so a large
# upload is never parsed whole in the web process.
SAMPLE_ROWS = 100_000


def detect_format(filename: str, declared: str | None = None) -> str:
    """The dataset format from an explicit ``format`` field or the file extension."""
    name = (declared or filename.rsplit(".", 1)[-1]).lower()
    if name not in FORMATS:
        raise SpecError.at("file", f"unsupported format {name!r}; upload CSV (.csv), JSON Lines (.jsonl), Parquet (.parquet) "
                                   "or a zip of images in class folders (.zip)")
    return FORMATS[name]


def read_frame(data: bytes, fmt: str):
    """Parse bytes as a pandas DataFrame, or raise SpecError saying what is wrong."""
    return _parse(io.BytesIO(data), fmt, nrows=None)


def _parse(source, fmt: str, *, nrows: int | None):
    import pandas as pd

    try:
        if fmt == "csv":
            frame = pd.read_csv(source, nrows=nrows)
        elif fmt == "jsonl":
            frame = pd.read_json(source, lines=True, nrows=nrows)
        elif nrows is None:
            frame = pd.read_parquet(source)
        else:
            import pyarrow.parquet as pq

            # The first batch of rows only: the rest of a large file is never read here.
            batch = next(pq.ParquetFile(source).iter_batches(batch_size=nrows), None)
            frame = batch.to_pandas() if batch is not None else pd.DataFrame()
    except pd.errors.EmptyDataError:
        raise SpecError.at("file", "the file is empty") from None
    except Exception as exc:  # noqa: BLE001 - any parser error is the uploader's to fix
        raise SpecError.at("file", f"could not read the file as {fmt}: {exc}") from None
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise SpecError.at("file", "the file has no rows or no columns")
    return frame


def _count_rows(path, fmt: str, sample_rows: int, sampled: int) -> int:
    """Rows of the whole file: the sample's count when it held every row, else counted by streaming.

    CSV and JSON Lines are counted by line breaks in 1 MiB chunks (a CSV header is not a row;
    a quoted CSV field holding a line break is counted as two rows), Parquet from its footer.
    """
    if sampled < sample_rows:
        return sampled
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    lines, last = 0, b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    lines += last != b"\n"  # a last line without its line break
    return lines - 1 if fmt == "csv" else lines


def infer_schema(frame) -> dict[str, Any]:
    """Columns with dtype, whether numeric, distinct count (the task rule's facts), missing and samples."""
    columns = []
    for name in frame.columns:
        series = frame[name]
        samples = series.dropna().head(MAX_SAMPLE_VALUES).tolist()
        described = {
            "name": str(name), **task_rules.describe_column(series), "missing": int(series.isna().sum()),
            "samples": [s if isinstance(s, (int, float, bool)) else str(s)[:80] for s in samples],
        }
        if samples and all(isinstance(s, bytes) for s in samples):
            described.update(_image_column(str(name), samples))
        columns.append(described)
    return {"columns": columns, "rows": int(frame.shape[0])}


def _image_column(name: str, samples: list[bytes]) -> dict[str, Any]:
    """Facts of a column of encoded images (its first values open as PNG or JPEG), else nothing."""
    sizes = []
    for i, value in enumerate(samples):
        try:
            sizes.append(list(images.open_image(value, f"column {name!r} row {i + 1}").size))
        except images.ImageError:
            return {"samples": [f"<{len(s)} bytes>" for s in samples]}
    return {"image": True, "image_sizes": sizes, "samples": [f"<image {w}x{h}>" for w, h in sizes]}


def _archive_schema(source) -> dict[str, Any]:
    try:
        return images.describe_archive(source)
    except images.ImageError as exc:
        raise SpecError.at("file", str(exc)) from None


def upload(*, session: Session, owner: User, filename: str, data: bytes | BinaryIO, settings: Settings,
           declared_format: str | None = None, name: str | None = None) -> Dataset:
    """Validate and store an uploaded file (bytes, or a stream copied in chunks), see :func:`store`."""
    writer = storage.AtomicWriter(settings.storage_root, f"datasets/{owner.id}")
    try:
        if isinstance(data, bytes):
            writer.write(data)
        else:
            while chunk := data.read(1 << 20):
                writer.write(chunk)
        return store(session=session, owner=owner, filename=filename, writer=writer, settings=settings,
                     declared_format=declared_format, name=name)
    finally:
        writer.abort()  # a no-op once stored


def store(*, session: Session, owner: User, filename: str, writer: storage.AtomicWriter, settings: Settings,
          declared_format: str | None = None, name: str | None = None) -> Dataset:
    """Record a file already written to storage by ``writer``: its format, sha256, row count and a
    schema inferred from its first ``SAMPLE_ROWS`` rows; then rename it into place (the caller commits).

    The caller aborts ``writer`` whatever happens (a no-op once stored). The storage quota is
    checked here, so the page and the API refuse the same upload.
    """
    from app import quotas

    fmt = detect_format(filename, declared_format)
    writer.close()
    if writer.size == 0:
        raise SpecError.at("file", "the file is empty")
    quotas.check_storage(session=session, user=owner, settings=settings, adding=writer.size)
    if fmt == "zip":
        schema = _archive_schema(writer.path)
    else:
        frame = _parse(writer.path, fmt, nrows=SAMPLE_ROWS)
        schema = infer_schema(frame)
        schema["rows"] = _count_rows(writer.path, fmt, SAMPLE_ROWS, int(frame.shape[0]))
        schema["sampled_rows"] = int(frame.shape[0])
    relative = f"datasets/{owner.id}/{uuid.uuid4().hex}.{fmt}"
    size, digest = writer.commit(relative)
    dataset = Dataset(
        owner_id=owner.id, name=(name or filename)[:200], format=fmt, path=relative, size_bytes=size,
        sha256=digest, num_rows=schema["rows"], schema=schema,
    )
    session.add(dataset)
    session.flush()
    return dataset


def get(*, session: Session, user: User, dataset_id: int) -> Dataset:
    """An uploaded dataset the user may see (others' answer NotFound)."""
    stmt = select(Dataset).where(Dataset.id == dataset_id)
    if not user.is_admin:
        stmt = stmt.where(Dataset.owner_id == user.id)
    dataset = session.execute(stmt).scalar_one_or_none()
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


def list_owned(*, session: Session, user: User) -> list[Dataset]:
    """The user's uploaded datasets, newest first."""
    return list(session.execute(
        select(Dataset).where(Dataset.owner_id == user.id).order_by(Dataset.id.desc())
    ).scalars())


def preview(
    *, session: Session, user: User, dataset_id: int, settings: Settings, limit: int = PREVIEW_ROWS,
) -> dict[str, Any]:
    """The first ``limit`` rows of a stored dataset as ``{"columns": [...], "rows": [[...]]}`` (JSON-safe).

    Only those rows are parsed (``nrows``, one Parquet batch), so a preview of a large upload is cheap.
    """
    import pandas as pd

    dataset = get(session=session, user=user, dataset_id=dataset_id)
    limit = max(1, min(limit, MAX_PREVIEW_ROWS))
    path = storage.resolve(settings.storage_root, dataset.path)
    try:
        if dataset.format == "zip":
            import zipfile

            with zipfile.ZipFile(path) as archive:
                members = images.list_members(archive)[:limit]
            return {"columns": [images.IMAGE_COLUMN, images.LABEL_COLUMN], "rows": [[m.name, m.label] for m in members]}
        if dataset.format == "csv":
            frame = pd.read_csv(path, nrows=limit)
        elif dataset.format == "jsonl":
            frame = pd.read_json(path, lines=True, nrows=limit)
        else:
            import pyarrow.parquet as pq

            batch = next(pq.ParquetFile(path).iter_batches(batch_size=limit), None)
            frame = batch.to_pandas() if batch is not None else pd.DataFrame()
    except FileNotFoundError:
        raise NotFound(f"the file of dataset {dataset_id} is missing from storage") from None
    body = json.loads(frame.head(limit).to_json(orient="split", index=False, date_format="iso"))
    return {"columns": [str(c) for c in body["columns"]], "rows": body["data"]}


def jobs_using(*, session: Session, dataset: Dataset) -> list[int]:
    """Ids of the owner's jobs that have not ended and train on ``dataset`` (these block its deletion)."""
    ref = f"{catalog.UPLOAD_PREFIX}{dataset.id}"
    rows = session.execute(
        select(Job.id, Job.spec).where(Job.owner_id == dataset.owner_id, Job.kind == "train",
                                       Job.state.not_in(TERMINAL)).order_by(Job.id)
    ).all()
    return [job_id for job_id, spec in rows if ((spec or {}).get("dataset") or {}).get("id") == ref]


def delete(*, session: Session, user: User, dataset_id: int, settings: Settings) -> None:
    """Delete an uploaded dataset: the file first, then the row (the caller commits).

    Refused (Conflict) while a job that has not ended (queued, running, paused) trains on it;
    ended jobs keep their spec, and a retry of one then fails as a user error naming the dataset.
    """
    dataset = get(session=session, user=user, dataset_id=dataset_id)
    blocking = jobs_using(session=session, dataset=dataset)
    if blocking:
        listed = ", ".join(f"#{j}" for j in blocking[:10])
        raise Conflict(f"dataset {dataset_id} is used by jobs that have not ended ({listed}); "
                       "cancel them or wait for them to finish, then delete it")
    storage.delete(settings.storage_root, dataset.path)
    session.delete(dataset)
    session.flush()

