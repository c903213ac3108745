"""The task rules both sides apply: which task an upload implies, and the default forecasting window.

The web's submit checks (on a dataset's stored schema) and the worker's preparation (on the loaded
frame) call these same functions, so a job that passes at submit is read the same way when it runs.
Torch-free; pandas is imported only by :func:`describe_column`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from app.catalog import (
    CLASSIFICATION, FORECASTING, GENERATIVE_TASKS, IMAGE_CLASSIFICATION, LANGUAGE_MODELING, REGRESSION,
    SEQUENCE_TO_SEQUENCE, TASKS, TEXT_CLASSIFICATION,
)

# An integer target with at most this many distinct values is read as class labels.
MAX_INFERRED_CLASSES = 20
# The window of a forecasting job whose spec and dataset name none.
DEFAULT_WINDOW = 16
# The side images are resized to when neither the spec nor a built-in gives one.
DEFAULT_IMAGE_SIZE = 32

# Which architectures serve which tasks. Images go to the 2-D CNN, or to the MLP, which reads
# the pixels flattened; sequence models have no reading of an image, and the 2-D CNN has none
# of a table, a window or a text.
_READING_TASKS = tuple(t for t in TASKS if t not in GENERATIVE_TASKS)
_NON_IMAGE_TASKS = tuple(t for t in _READING_TASKS if t != IMAGE_CLASSIFICATION)
ARCHITECTURE_TASKS: dict[str, tuple[str, ...]] = {
    "mlp": _READING_TASKS,
    "rnn": _NON_IMAGE_TASKS,
    "lstm": _NON_IMAGE_TASKS,
    "gru": _NON_IMAGE_TASKS,
    "transformer": _NON_IMAGE_TASKS,
    "cnn1d": _NON_IMAGE_TASKS,
    "cnn2d": (IMAGE_CLASSIFICATION,),
    # Fine-tuned catalog models read a text column: a class (or a number, with a regression head)
    # per text. Which head a catalog entry supports is checked against the catalog at submit.
    "pretrained": (TEXT_CLASSIFICATION, CLASSIFICATION, REGRESSION),
    # Text generators: a decoder-only transformer continues a text column; an encoder-decoder
    # writes a target text for a source text. Neither reads tables, windows or images.
    "causal_lm": (LANGUAGE_MODELING,),
    "seq2seq": (SEQUENCE_TO_SEQUENCE,),
}


def architecture_error(arch: str, task: str) -> str | None:
    """Why ``arch`` cannot serve ``task``, or None when it can."""
    tasks = ARCHITECTURE_TASKS.get(arch, ())
    if task in tasks:
        return None
    serving = ", ".join(a for a, ts in ARCHITECTURE_TASKS.items() if task in ts)
    return f"{arch} does not serve {task} datasets; use one of: {serving}"


def image_size(size: int | None, dataset_default: int | None = None) -> int:
    """The side images are resized to: the spec's, else the built-in's own, else ``DEFAULT_IMAGE_SIZE``."""
    return size or dataset_default or DEFAULT_IMAGE_SIZE


def describe_column(series) -> dict[str, Any]:
    """The facts the task rule reads about a pandas column: dtype, numeric (booleans are not), distinct values."""
    import pandas as pd

    numeric = bool(pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series))
    return {"dtype": str(series.dtype), "numeric": numeric, "distinct": int(series.nunique(dropna=True))}


def infer_task(*, text_column: str | None, window: int | None, target: Mapping[str, Any] | None,
               image_column: str | None = None) -> str:
    """The task a dataset reference implies when it names none.

    An image column (a zip of class folders always has one) means image classification;
    a text column means text classification; a window means forecasting; a target that is not
    numeric (or unknown), or an integer one with at most ``MAX_INFERRED_CLASSES`` distinct values,
    means classification; any other numeric target means regression. ``target`` holds the facts
    of :func:`describe_column` (as stored in an upload's schema).
    """
    if image_column is not None:
        return IMAGE_CLASSIFICATION
    if text_column is not None:
        return TEXT_CLASSIFICATION
    if window is not None:
        return FORECASTING
    if target is None or not target["numeric"]:
        return CLASSIFICATION
    integer = str(target["dtype"]).lower().startswith(("int", "uint"))
    if integer and target["distinct"] <= MAX_INFERRED_CLASSES:
        return CLASSIFICATION
    return REGRESSION


def forecast_window(window: int | None, dataset_default: int | None = None) -> int:
    """The window a forecasting job uses: the spec's, else the dataset's default, else ``DEFAULT_WINDOW``."""
    return window or dataset_default or DEFAULT_WINDOW


_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """Lower-cased words of a text, in order: the tokens a text model reads (and the submit check counts)."""
    return _WORD.findall(text.lower())
