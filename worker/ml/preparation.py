"""Turning a loaded table into arrays for one task: columns, labels, windows, tokens, normalisation.

Decisions a user may notice:
- The task is ``dataset.task`` if given, else the built-in's catalog task; for uploads the rule of
  ``app.task_rules.infer_task`` (the one the web's submit checks apply to the stored schema).
- An upload's target defaults to its last column (for text, a column named ``label`` if any);
  its features to every other numeric column; a text column defaults to one named ``text``.
- Forecasting is univariate (the target column only) and split in time order, never shuffled:
  train, then validation, then test; a window whose targets straddle two parts is dropped.
- Normalisation statistics come from the training part only and travel in the checkpoint.
- Text classification reads lower-cased words (default) or byte-level BPE subwords
  (``dataset.tokenizer``), or, for ``mlp`` with ``model.tfidf``, TF-IDF n-gram features; each is
  fitted on the training part only and saved in the checkpoint, and a resumed job reads the saved
  one back instead of fitting it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from app.catalog import (
    CLASSIFICATION, CLASSIFYING_TASKS, FORECASTING, GENERATIVE_TASKS, IMAGE_CLASSIFICATION, REGRESSION,
    TEXT_CLASSIFICATION,
)
from app.jobs.errors import UserError
from app.jobs.schemas import GENERATIVE_ARCHITECTURES, DatasetRef
from app.task_rules import describe_column, forecast_window, image_size, infer_task
from worker.ml.datasets import Table, split_indices
from worker.ml.text import SubwordTokenizer, TfidfFeaturizer, Tokenizer, WordNgrams


@dataclass
class Standardizer:
    """Per-feature mean and standard deviation from the training rows."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray, axis: int | tuple[int, ...] = 0) -> "Standardizer":
        """Statistics of ``values`` along ``axis``; a constant feature keeps scale 1."""
        mean = np.asarray(values, dtype=np.float64).mean(axis=axis)
        std = np.asarray(values, dtype=np.float64).std(axis=axis)
        return cls(mean=np.atleast_1d(mean), std=np.atleast_1d(np.where(std > 1e-12, std, 1.0)))

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Standardised values."""
        return (values - self.mean) / self.std

    def invert(self, values: np.ndarray) -> np.ndarray:
        """Values back in original units."""
        return values * self.std + self.mean


@dataclass
class PreparedData:
    """Arrays for training, validation and test, and what prediction needs to repeat the encoding."""

    task: str
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    signature: dict
    features: Standardizer | None = None
    targets: Standardizer | None = None
    tokenizer: Tokenizer | SubwordTokenizer | None = None
    # Images: (batch, indices, seed, epoch) -> the batch augmented (training batches only).
    augment: Callable | None = None
    # Text generators: the character, word or BPE codec of ``worker.ml.text_codecs`` (saved in checkpoints).
    codec: object | None = None
    # ``mlp`` with ``model.tfidf`` on text: the fitted n-grams and idf weights (saved in checkpoints).
    featurizer: TfidfFeaturizer | None = None
    # Token-reading text classifiers: the wide path's word n-grams (saved in checkpoints) and their idf.
    word_ngrams: WordNgrams | None = None
    word_ngrams_idf: np.ndarray | None = None


@dataclass
class SavedText:
    """A resumed text classifier's tokenizer or TF-IDF features, as its checkpoint holds them."""

    vocabulary: list[str] | None = None
    tokenizer: str | None = None
    idf: np.ndarray | None = None
    wide_terms: list[str] | None = None  # the wide path's word n-grams, and how many a row holds
    wide_width: int | None = None
    tfidf_words: str = "kiln"  # how the TF-IDF features read words (worker.ml.text.TfidfFeaturizer)


def prepare(dataset: DatasetRef, table: Table, model=None, saved: SavedText | None = None, *,
            word_ngrams: bool = False) -> PreparedData:
    """Choose columns and task, split, encode and normalise the rows of ``table`` (for ``model``'s input).

    ``saved``: the text encoding of the checkpoint a job resumes from, used instead of a fresh fit.
    ``word_ngrams``: text read as tokens gets the wide path's word n-grams after the token ids.
    """
    if getattr(model, "arch", None) == "pretrained":
        data = _prepare_pretrained(dataset, table, model)
        data.signature.update(dataset=dataset.id, normalize=dataset.normalize)
        data.signature["rows"] = {name: int(len(y)) for name, (_, y) in data.splits.items()}
        return data
    task = _task_of(dataset, table)
    if task in GENERATIVE_TASKS or getattr(model, "arch", None) in GENERATIVE_ARCHITECTURES:
        from worker.ml.text_codecs import prepare_generative

        data = prepare_generative(dataset, table, model, task)
        data.signature.update(task=data.task, dataset=dataset.id, normalize=dataset.normalize)
        data.signature["rows"] = {name: int(len(y)) for name, (_, y) in data.splits.items()}
        return data
    # Settings that only one task reads are refused elsewhere, so a mistake is never ignored.
    if dataset.window is not None and task != FORECASTING:
        raise UserError(f"dataset.window applies to forecasting, and this is a {task} job")
    if dataset.text_column is not None and task != TEXT_CLASSIFICATION:
        raise UserError(f"dataset.text_column applies to text classification, and this is a {task} job")
    if dataset.tokenizer is not None and task != TEXT_CLASSIFICATION:
        raise UserError(f"dataset.tokenizer applies to text classification, and this is a {task} job")
    if getattr(model, "tfidf", None) is not None and task != TEXT_CLASSIFICATION:
        raise UserError(f"model.tfidf applies to text classification, and this is a {task} job")
    if task != IMAGE_CLASSIFICATION and (dataset.image_column, dataset.image_size, dataset.augment) != (None,) * 3:
        raise UserError(f"dataset.image_column, image_size and augment apply to images, and this is a {task} job")
    if task == FORECASTING:
        data = _prepare_forecasting(dataset, table)
    elif task == TEXT_CLASSIFICATION:
        data = _prepare_text(dataset, table, getattr(model, "tfidf", None), saved, model if word_ngrams else None)
    elif task == IMAGE_CLASSIFICATION:
        data = _prepare_images(dataset, table)
    else:
        data = _prepare_tabular(dataset, table, task)
    data.signature.update(task=task, dataset=dataset.id, normalize=dataset.normalize)
    data.signature["rows"] = {name: int(len(y)) for name, (_, y) in data.splits.items()}
    return data


def _task_of(dataset: DatasetRef, table: Table) -> str:
    if table.task is not None:
        if dataset.task is not None and dataset.task != table.task:
            raise UserError(f"{dataset.id} is a {table.task} dataset; it cannot be used for {dataset.task}")
        return table.task
    if dataset.task is not None:
        return dataset.task
    if dataset.text_column is not None or dataset.window is not None or dataset.image_column is not None:
        return infer_task(text_column=dataset.text_column, window=dataset.window, target=None,
                          image_column=dataset.image_column)
    target = _column(table.frame, dataset.target or table.frame.columns[-1], "target")
    return infer_task(text_column=None, window=None, target=describe_column(table.frame[target]))


def _column(frame: pd.DataFrame, name: str, role: str) -> str:
    if name not in frame.columns:
        shown = ", ".join(repr(c) for c in list(frame.columns)[:50])
        raise UserError(f"unknown {role} column {name!r}; the dataset has columns: {shown}")
    return name


def _target_of(dataset: DatasetRef, table: Table) -> str:
    if table.target is not None and dataset.target not in (None, table.target):
        raise UserError(f"{dataset.id} has target column {table.target!r}, not {dataset.target!r}")
    return _column(table.frame, dataset.target or table.target or table.frame.columns[-1], "target")


def _numeric(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A column as float64, or a UserError naming the column and the first bad row (1-based)."""
    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce") if not pd.api.types.is_bool_dtype(raw) else raw.astype(float)
    bad = np.flatnonzero(values.isna().to_numpy() & raw.notna().to_numpy())
    if len(bad):
        row = int(bad[0])
        raise UserError(f"column {column!r} has a non-numeric value {raw.iloc[row]!r} at row {row + 1}")
    missing = np.flatnonzero(values.isna().to_numpy())
    if len(missing):
        raise UserError(f"column {column!r} has no value at row {int(missing[0]) + 1}")
    return values.to_numpy(dtype=np.float64)


def _labels(table: Table, target: str) -> tuple[np.ndarray, list]:
    values = table.frame[target]
    if table.classes is not None:
        return values.to_numpy(dtype=np.int64), list(table.classes)
    missing = np.flatnonzero(values.isna().to_numpy())
    if len(missing):
        raise UserError(f"target column {target!r} has no value at row {int(missing[0]) + 1}")
    plain = [v.item() if hasattr(v, "item") else v for v in values.tolist()]
    try:
        classes = sorted(set(plain))
    except TypeError:  # mixed types, e.g. 1 and "a": order them as text
        classes = sorted(set(plain), key=str)
    if len(classes) < 2:
        raise UserError(f"target column {target!r} has a single class ({classes[0]!r}); "
                        "classification needs at least two")
    index = {label: i for i, label in enumerate(classes)}
    return np.array([index[v] for v in plain], dtype=np.int64), classes


def _split(n: int, dataset: DatasetRef) -> dict[str, np.ndarray]:
    train, val, test = split_indices(n, dataset.split)
    if len(train) == 0:
        raise UserError(f"too few rows ({n}) to leave any for training after the validation and test split")
    return {"train": train, "val": val, "test": test}


def _prepare_tabular(dataset: DatasetRef, table: Table, task: str) -> PreparedData:
    frame = table.frame
    target = _target_of(dataset, table)
    if dataset.features is not None:
        features = [_column(frame, name, "feature") for name in dataset.features]
    elif table.feature_names is not None:
        features = list(table.feature_names)
    else:
        features = [c for c in frame.columns if c != target and pd.api.types.is_numeric_dtype(frame[c])]
    if not features:
        raise UserError("no numeric feature columns; name them in dataset.features")
    if target in features:
        raise UserError(f"column {target!r} is the target; it cannot also be a feature")
    x = np.stack([_numeric(frame, name) for name in features], axis=1)
    classes = None
    if task == CLASSIFICATION:
        y, classes = _labels(table, target)
    else:
        y = _numeric(frame, target)
    parts = _split(len(frame), dataset)
    features_scale = Standardizer.fit(x[parts["train"]]) if dataset.normalize else None
    targets_scale = None
    if task == REGRESSION and dataset.normalize:
        targets_scale = Standardizer.fit(y[parts["train"]])
    if features_scale is not None:
        x = features_scale.apply(x)
    if targets_scale is not None:
        y = targets_scale.apply(y)
    shape = table.sequence_shape
    if shape is None or shape[0] * shape[1] != len(features) or features != table.feature_names:
        shape = (len(features), 1)
    signature = {
        "input_kind": "vector", "input_shape": [len(features)], "sequence_shape": list(shape),
        "num_outputs": len(classes) if classes is not None else 1, "classes": classes,
        "target": target, "feature_names": features,
    }
    splits = {name: (x[idx].astype(np.float32), _target_dtype(y[idx], task)) for name, idx in parts.items()}
    return PreparedData(task, splits, signature, features_scale, targets_scale)


def _target_dtype(y: np.ndarray, task: str) -> np.ndarray:
    return y.astype(np.int64) if task in CLASSIFYING_TASKS else y.astype(np.float32)


def _prepare_forecasting(dataset: DatasetRef, table: Table) -> PreparedData:
    if dataset.features:
        raise UserError("forecasting reads only the target column's past values; leave dataset.features unset")
    frame = table.frame
    if dataset.target is None and table.target is None:
        numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        target = numeric[0] if len(numeric) == 1 else _column(frame, frame.columns[-1], "target")
    else:
        target = _target_of(dataset, table)
    series = _numeric(frame, target)
    window = forecast_window(dataset.window, table.default_window)
    horizon = dataset.horizon
    n = len(series)
    # Cut the series in time; a window belongs to the part that holds all of its targets.
    targets_total = n - window
    train_fraction = 1.0 - dataset.split.val_fraction - dataset.split.test_fraction
    cut_val = window + int(round(max(targets_total, 0) * train_fraction))
    cut_test = window + int(round(max(targets_total, 0) * (1.0 - dataset.split.test_fraction)))
    bounds = {"train": (window, cut_val), "val": (cut_val, cut_test), "test": (cut_test, n)}
    starts = {name: np.arange(lo - window, hi - window - horizon + 1) for name, (lo, hi) in bounds.items()}
    fractions = {"train": train_fraction, "val": dataset.split.val_fraction, "test": dataset.split.test_fraction}
    short = [name for name, s in starts.items() if len(s) < 1 and fractions[name] > 0]
    if short:
        raise UserError(
            f"too few rows ({n}) for window {window} and horizon {horizon}: the {', '.join(short)} part "
            f"gets no complete window; use a shorter window or more data"
        )
    scale = Standardizer.fit(series[:cut_val]) if dataset.normalize else None
    scaled = scale.apply(series) if scale is not None else series
    splits = {}
    for name, s in starts.items():
        x = np.stack([scaled[i:i + window] for i in s]) if len(s) else np.zeros((0, window))
        y = np.stack([scaled[i + window:i + window + horizon] for i in s]) if len(s) else np.zeros((0, horizon))
        splits[name] = (x[..., None].astype(np.float32), y.astype(np.float32))
    signature = {
        "input_kind": "sequence", "input_shape": [window, 1], "sequence_shape": [window, 1],
        "num_outputs": horizon, "classes": None, "target": target, "feature_names": [target],
        "window": window, "horizon": horizon,
    }
    return PreparedData(FORECASTING, splits, signature, scale, scale)


def _text_and_target(dataset: DatasetRef, table: Table) -> tuple[str, str]:
    frame = table.frame
    if dataset.text_column is not None:
        text_column = _column(frame, dataset.text_column, "text")
    elif "text" in frame.columns:
        text_column = "text"
    else:
        raise UserError("text classification needs dataset.text_column naming the column that holds the text")
    others = [c for c in frame.columns if c != text_column]
    if dataset.target is None and not others:
        raise UserError(f"the dataset has only the text column {text_column!r}; it needs a label column too")
    default_target = "label" if "label" in others else others[-1]
    target = _column(frame, dataset.target or default_target, "target")
    if target == text_column:
        raise UserError(f"column {target!r} cannot be both the text and the target")
    return text_column, target


def _prepare_text(dataset: DatasetRef, table: Table, tfidf=None, saved: SavedText | None = None,
                  wide=None) -> PreparedData:
    frame = table.frame
    text_column, target = _text_and_target(dataset, table)
    y, classes = _labels(table, target)
    texts = frame[text_column].fillna("").astype(str).tolist()
    parts = _split(len(frame), dataset)
    signature = {"num_outputs": len(classes), "classes": classes, "target": target, "feature_names": [text_column],
                 "text_column": text_column}
    if tfidf is not None:
        if dataset.tokenizer is not None:
            raise UserError("model.tfidf reads word n-grams; drop dataset.tokenizer")
        if saved is not None and saved.idf is not None:
            featurizer = TfidfFeaturizer(saved.vocabulary, saved.idf, tfidf.ngram_max, tfidf.sublinear_tf,
                                         saved.tfidf_words)
        else:
            featurizer = TfidfFeaturizer.fit([texts[i] for i in parts["train"]], ngram_max=tfidf.ngram_max,
                                             max_features=tfidf.max_features, min_df=tfidf.min_df,
                                             sublinear_tf=tfidf.sublinear_tf)
        x = featurizer.transform(texts)
        width = len(featurizer.ngrams)
        signature.update(input_kind="tfidf", input_shape=[width], sequence_shape=[width, 1], tokenizer="tfidf",
                         vocab_size=width, tfidf_words=featurizer.words)
        splits = {name: (x[idx], y[idx]) for name, idx in parts.items()}
        return PreparedData(TEXT_CLASSIFICATION, splits, signature, featurizer=featurizer)
    kind = dataset.tokenizer.kind if dataset.tokenizer is not None else "word"
    train_texts = (texts[i] for i in parts["train"])
    if kind == "word":
        tokenizer = (Tokenizer(saved.vocabulary, dataset.max_tokens) if saved is not None and saved.vocabulary
                     else Tokenizer.build(train_texts, vocab_size=dataset.token_vocab_size, max_tokens=dataset.max_tokens))
        size = len(tokenizer.vocabulary)
    else:
        tokenizer = (SubwordTokenizer.from_json(saved.tokenizer) if saved is not None and saved.tokenizer
                     else SubwordTokenizer.build(train_texts, kind=kind, vocab_size=dataset.token_vocab_size,
                                                 max_tokens=dataset.max_tokens))
        size = tokenizer.tokenizer.get_vocab_size()
    ids = tokenizer.encode(texts)
    signature.update(input_kind="tokens", input_shape=[dataset.max_tokens], sequence_shape=[dataset.max_tokens, 1],
                     max_tokens=dataset.max_tokens, vocab_size=size)
    if kind != "word":
        from worker.ml.text_codecs import sha256_of

        signature.update(tokenizer=kind, tokenizer_sha256=sha256_of(tokenizer.to_json()))
    ngrams, idf = None, None
    if wide is not None:  # the model's settings: the wide path reads word n-grams
        ngrams, idf = _word_ngrams([texts[i] for i in parts["train"]], wide, dataset.token_vocab_size, saved)
        ids = np.concatenate([ids, ngrams.encode(texts)], axis=1)
        signature.update(input_shape=[ids.shape[1]], wide_terms=len(ngrams.terms), wide_width=ngrams.width)
    splits = {name: (ids[idx], y[idx]) for name, idx in parts.items()}
    return PreparedData(TEXT_CLASSIFICATION, splits, signature, tokenizer=tokenizer, word_ngrams=ngrams,
                        word_ngrams_idf=idf)


def _word_ngrams(train_texts: list[str], model, vocab_size: int,
                 saved: SavedText | None) -> tuple[WordNgrams, np.ndarray | None]:
    """The wide path's word n-grams: fitted on the training texts, or a resumed checkpoint's (idf in its weights)."""
    if saved is not None and saved.wide_terms is not None:
        return WordNgrams(saved.wide_terms, model.wide_ngram_max, int(saved.wide_width)), None
    # At most as many n-grams as the token n-gram path had ids (vocabulary + buckets): the size estimate holds.
    return WordNgrams.fit(train_texts, ngram_max=model.wide_ngram_max, max_terms=vocab_size + model.wide_buckets)


def _prepare_images(dataset: DatasetRef, table: Table) -> PreparedData:
    import torch

    from worker.ml import images

    if dataset.features or dataset.text_column or dataset.window:
        raise UserError("an image dataset reads only its images and labels; drop features, text_column and window")
    frame = table.frame
    target = _target_of(dataset, table)
    own_side = table.image_shape[-1] if table.image_shape else None
    side = image_size(dataset.image_size, own_side)
    if isinstance(table.images, np.ndarray):  # a built-in's pixels
        channels = table.images.shape[1]
        pixels = images.resize(torch.from_numpy(np.ascontiguousarray(table.images, dtype=np.float32)), side).numpy()
        source = "image"
    else:
        if table.images is not None:
            encoded, source = table.images, "image"
        else:
            source = _column(frame, dataset.image_column or "image", "image")
            encoded = frame[source].tolist()
            for i, value in enumerate(encoded):
                if not isinstance(value, (bytes, bytearray)):
                    raise UserError(f"column {source!r} holds no encoded image at row {i + 1}")
        channels = 3  # uploads are read as RGB, whatever their mode
        pixels = images.pixels_of(encoded, "image {i}", channels, side)
    y, classes = _labels(table, target)
    parts = _split(len(frame), dataset)
    mean, std = images.channel_statistics(pixels[parts["train"]])
    scale = Standardizer(mean, std) if dataset.normalize else None
    if scale is not None:
        pixels = scale.apply(pixels)
    splits = {name: (pixels[idx].astype(np.float32), y[idx]) for name, idx in parts.items()}
    shape = [channels, side, side]
    signature = {
        "input_kind": "image", "input_shape": shape, "sequence_shape": [channels * side, side],
        "image_shape": shape, "image_size": side, "channels": channels,
        "image_mean": [float(v) for v in mean.ravel()] if scale is not None else None,
        "image_std": [float(v) for v in std.ravel()] if scale is not None else None,
        "num_outputs": len(classes), "classes": classes, "target": target, "feature_names": [source],
        "image_column": source,
    }
    return PreparedData(IMAGE_CLASSIFICATION, splits, signature, features=scale,
                        augment=images.augmenter(IMAGE_CLASSIFICATION, dataset.augment))


def _prepare_pretrained(dataset: DatasetRef, table: Table, model) -> PreparedData:
    """A text column through a catalog model's own tokenizer; class labels, or a standardised value."""
    from worker.ml.pretrained import INPUT_KIND, PretrainedTokenizer, locate

    task = TEXT_CLASSIFICATION if model.head == "classification" else REGRESSION
    if dataset.task is not None and dataset.task != task and not (task == TEXT_CLASSIFICATION
                                                                  and dataset.task == CLASSIFICATION):
        raise UserError(f"a {model.head} head needs a {task} dataset, not {dataset.task}")
    if table.task is not None:
        raise UserError(f"{dataset.id} has no text column; fine-tuning a pretrained model needs text")
    frame = table.frame
    text_column, target = _text_and_target(dataset, table)
    parts = _split(len(frame), dataset)
    classes, targets_scale = None, None
    if task == TEXT_CLASSIFICATION:
        y, classes = _labels(table, target)
    else:
        y = _numeric(frame, target)
        if dataset.normalize:
            targets_scale = Standardizer.fit(y[parts["train"]])
            y = targets_scale.apply(y)
    tokenizer = PretrainedTokenizer(model.base, model.max_length)
    ids = tokenizer.encode(frame[text_column].fillna("").astype(str).tolist())
    entry, _ = locate(model.base)
    splits = {name: (ids[idx], _target_dtype(y[idx], task)) for name, idx in parts.items()}
    signature = {
        "input_kind": INPUT_KIND, "input_shape": [model.max_length], "sequence_shape": [model.max_length, 1],
        "num_outputs": len(classes) if classes is not None else 1, "classes": classes, "target": target,
        "feature_names": [text_column], "text_column": text_column, "max_length": model.max_length,
        "base": entry.name, "base_sha256": entry.sha256, "base_hf_name": entry.hf_name, "task": task,
    }
    return PreparedData(task, splits, signature, None, targets_scale)
