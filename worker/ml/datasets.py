"""Where rows come from: the built-in datasets, uploaded files, and the seeded train/val/test split.

Built-ins come from scikit-learn and statsmodels package data or are generated, so nothing is
downloaded at run time; their shapes agree with ``app.catalog`` (a test checks every entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from app.catalog import BUILTIN_DATASETS, IMAGE_CLASSIFICATION, UPLOAD_PREFIX, builtin
from app.jobs.errors import UserError
from app.jobs.schemas import DatasetRef, SplitConfig

UPLOAD_FORMATS = ("csv", "jsonl", "parquet", "zip")


@dataclass
class Table:
    """A dataset as loaded: one frame, plus what its source already knows about it."""

    frame: pd.DataFrame
    task: str | None = None
    target: str | None = None
    feature_names: list[str] | None = None
    # Built-in classification targets hold class indices; these are the labels they stand for.
    classes: list | None = None
    sequence_shape: tuple[int, int] | None = None
    default_window: int | None = None
    # Image sets: pixels (rows, channels, h, w) in [0, 1] of a built-in, or the encoded files of a zip.
    images: np.ndarray | list[bytes] | None = None
    image_shape: tuple[int, int, int] | None = None


def split_indices(n: int, split: SplitConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test row indices: a permutation seeded by ``split.seed`` alone."""
    # Raw PCG64 output is guaranteed stable across numpy releases (NEP 19), unlike Generator
    # methods such as permutation(), so sorting by it gives a split that never moves.
    keys = np.random.PCG64(split.seed).random_raw(n)
    order = np.argsort(keys, kind="stable")
    n_test = int(round(n * split.test_fraction))
    n_val = int(round(n * split.val_fraction))
    test = np.sort(order[:n_test])
    val = np.sort(order[n_test:n_test + n_val])
    train = np.sort(order[n_test + n_val:])
    return train, val, test


def load_builtin_raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw features (rows, features) and targets of a built-in, as a client would send them."""
    table = _load_builtin(name)
    if table.task == "forecasting":
        series = table.frame[table.target].to_numpy(dtype=np.float64)
        return series.reshape(-1, 1), series
    features = table.frame[table.feature_names].to_numpy(dtype=np.float64)
    return features, table.frame[table.target].to_numpy()


def load_table(dataset: DatasetRef, dataset_file: Path | None, dataset_format: str | None) -> Table:
    """Load the rows a spec names: a built-in by name, or an uploaded file."""
    if dataset.id.startswith(UPLOAD_PREFIX):
        if dataset_file is None:
            raise ValueError(f"{dataset.id} needs dataset_file and dataset_format")
        fmt = dataset_format or _format_of(dataset_file)
        if fmt == "zip":
            from worker.ml.images import read_archive

            encoded, labels = read_archive(Path(dataset_file))
            return Table(frame=labels, task=IMAGE_CLASSIFICATION, target=labels.columns[0], images=encoded)
        return Table(frame=read_upload(Path(dataset_file), fmt))
    entry = builtin(dataset.id)
    if entry is None:
        raise UserError(f"unknown built-in dataset {dataset.id!r}; choose one of "
                        + ", ".join(f"builtin:{name}" for name in BUILTIN_DATASETS))
    return _load_builtin(entry.name)


def read_upload(path: Path, dataset_format: str) -> pd.DataFrame:
    """Read an uploaded CSV, JSON Lines or Parquet file into a frame, or say why it cannot be."""
    if dataset_format not in UPLOAD_FORMATS:
        raise UserError(f"unsupported dataset format {dataset_format!r}; use one of {', '.join(UPLOAD_FORMATS)}")
    if path.stat().st_size == 0:
        raise UserError("the dataset file is empty")
    try:
        if dataset_format == "csv":
            frame = pd.read_csv(path)
        elif dataset_format == "jsonl":
            frame = pd.read_json(path, lines=True)
        else:
            frame = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise UserError("the dataset file is empty") from None
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        raise UserError(f"could not read the dataset as {dataset_format}: {exc}") from None
    if len(frame) == 0:
        raise UserError("the dataset file has a header but no rows")
    frame.columns = [str(column) for column in frame.columns]
    return frame


def _format_of(path: Path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return {"json": "jsonl", "ndjson": "jsonl", "pq": "parquet"}.get(suffix, suffix)


def _load_builtin(name: str) -> Table:
    loader = _BUILTIN_LOADERS.get(name)
    if loader is None:
        raise UserError(f"unknown built-in dataset {name!r}")
    table = loader()
    entry = BUILTIN_DATASETS[name]
    table.task = entry.task
    table.target = entry.target
    table.sequence_shape = entry.sequence_shape
    table.default_window = entry.default_window
    table.image_shape = entry.image_shape
    return table


def _sklearn_table(loader_name: str, target: str, *, class_names: bool = True, **kwargs) -> Table:
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, loader_name)(**kwargs)
    names = [str(n) for n in bunch.feature_names]
    frame = pd.DataFrame(np.asarray(bunch.data, dtype=np.float64), columns=names)
    frame[target] = bunch.target
    classes = None
    if class_names:
        classes = [n.item() if hasattr(n, "item") else str(n) for n in bunch.target_names]
    return Table(frame=frame, feature_names=names, classes=classes)


def _digits() -> Table:
    return _sklearn_table("load_digits", "digit")


def _digits_images() -> Table:
    # Pixels 0..16 scaled to [0, 1], as a PNG's 0..255 would be; the flat columns stay for load_builtin_raw.
    table = _digits()
    pixels = table.frame[table.feature_names].to_numpy(dtype=np.float32) / 16.0
    table.images = pixels.reshape(-1, 1, 8, 8)
    return table


def _iris() -> Table:
    return _sklearn_table("load_iris", "species")


def _wine() -> Table:
    return _sklearn_table("load_wine", "cultivar")


def _breast_cancer() -> Table:
    return _sklearn_table("load_breast_cancer", "diagnosis")


def _diabetes() -> Table:
    # scaled=False keeps the original units, which is what a client sends for prediction.
    return _sklearn_table("load_diabetes", "progression", class_names=False, scaled=False)


def _sunspots() -> Table:
    import statsmodels.api as sm

    data = sm.datasets.sunspots.load_pandas().data
    return Table(frame=pd.DataFrame({"SUNACTIVITY": data["SUNACTIVITY"].astype(np.float64).to_numpy()}))


def _co2() -> Table:
    import statsmodels.api as sm

    weekly = sm.datasets.co2.load_pandas().data["co2"]
    # Weekly readings have gaps; monthly means with the few empty months interpolated.
    monthly = weekly.resample("MS").mean().interpolate(limit_direction="both")
    return Table(frame=pd.DataFrame({"co2": monthly.to_numpy(dtype=np.float64)}))


def _sine() -> Table:
    rng = np.random.Generator(np.random.PCG64(0))
    t = np.arange(2000, dtype=np.float64)
    value = np.sin(2 * np.pi * t / 50.0) + 0.1 * rng.standard_normal(2000)
    return Table(frame=pd.DataFrame({"value": value}))


def _fortunes() -> Table:
    # Read from the Debian package's data file (never imported); one row per fortune, "%" lines between.
    entry = BUILTIN_DATASETS["fortunes"]
    try:
        raw = Path(entry.corpus_file).read_text(encoding="utf-8", errors="replace")
    except OSError:
        raise UserError(f"builtin:fortunes needs the Debian package {entry.package!r} on the worker "
                        f"(apt-get install {entry.package})") from None
    texts = [part.strip() for part in raw.split("\n%\n")]
    return Table(frame=pd.DataFrame({"text": [t for t in texts if t and t != "%"]}))


_BUILTIN_LOADERS = {
    "digits": _digits,
    "digits_images": _digits_images,
    "iris": _iris,
    "wine": _wine,
    "breast_cancer": _breast_cancer,
    "diabetes": _diabetes,
    "sunspots": _sunspots,
    "co2": _co2,
    "sine": _sine,
    "fortunes": _fortunes,
}
