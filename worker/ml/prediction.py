"""Prediction from a checkpoint: raw rows in, class labels or values in original units out.

Loaded models stay in a small LRU serving cache keyed by the checkpoint's sha256 (and device),
so a prediction worker answering many requests for one model reads its checkpoint once.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import TypeAdapter

from app.jobs.errors import UserError
from app.jobs.schemas import ModelConfig
from worker.ml import checkpoints
from worker.ml.architectures import ModelShape, build_model
from worker.ml.devices import out_of_memory, resolve_device
from worker.ml.preparation import FORECASTING, REGRESSION, Standardizer
from worker.ml.progress import load_weights
from worker.ml.text import Tokenizer

CACHE_SIZE = 8
BATCH_SIZE = 1024
_model_config = TypeAdapter(ModelConfig)


@dataclass
class LoadedModel:
    """A network ready to serve, with what it needs to encode inputs and decode outputs."""

    network: torch.nn.Module
    signature: dict
    features: Standardizer | None
    targets: Standardizer | None
    tokenizer: Tokenizer | None
    device: torch.device


_cache: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
_cache_lock = threading.Lock()


def signature(checkpoint: bytes) -> dict:
    """The model signature stored in a checkpoint (task, input shape, classes, ...)."""
    return checkpoints.signature_of(checkpoint)


def load_model(checkpoint: bytes | Callable[[], bytes], device: torch.device, *,
               digest: str | None = None) -> LoadedModel:
    """The served model of a checkpoint, from the LRU cache when it was loaded recently.

    With ``digest`` (the checkpoint's verified sha256, from its row) a cached model is found
    without the bytes, and ``checkpoint`` may be a function that reads them, called on a miss only.
    """
    if digest is None:
        if callable(checkpoint):
            checkpoint = checkpoint()
        digest = hashlib.sha256(checkpoint).hexdigest()
    key = (digest, str(device))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    if callable(checkpoint):
        checkpoint = checkpoint()
    saved = checkpoints.decode(checkpoint)
    sig = saved.signature
    network = build_model(_model_config.validate_python(sig["model"]), ModelShape.from_signature(sig))
    load_weights(network, saved.model, "prediction")
    network.to(device).eval()
    features, targets = checkpoints.unpack_standardizers(saved.normalizer)
    tokenizer = Tokenizer(saved.vocabulary, int(sig["max_tokens"])) if saved.vocabulary is not None else None
    loaded = LoadedModel(network, sig, features, targets, tokenizer, device)
    with _cache_lock:
        _cache[key] = loaded
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return loaded


def evict(digest: str) -> int:
    """Forget the cached models of the checkpoint with sha256 ``digest`` (every device); returns how many."""
    with _cache_lock:
        keys = [key for key in _cache if key[0] == digest]
        for key in keys:
            del _cache[key]
    return len(keys)


def clear_cache() -> None:
    """Forget every cached model (tests, or a worker freeing memory)."""
    with _cache_lock:
        _cache.clear()


def encode_inputs(loaded: LoadedModel, inputs: list) -> torch.Tensor:
    """Raw rows as the model's input tensor, normalised with the training statistics."""
    sig = loaded.signature
    if sig["input_kind"] == "tokens":
        for i, row in enumerate(inputs):
            if not isinstance(row, str):
                raise UserError(f"inputs[{i}] must be a text string; this model classifies text")
        return torch.from_numpy(loaded.tokenizer.encode(inputs))
    shape = [int(n) for n in sig["input_shape"]]
    width = int(np.prod(shape))
    rows = []
    for i, row in enumerate(inputs):
        if isinstance(row, str):
            raise UserError(f"inputs[{i}] is text; the model expects {width} numbers")
        try:
            values = np.asarray(row, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise UserError(f"inputs[{i}] is not a list of numbers (nested lists must be rectangular)") from None
        if values.size != width:
            raise UserError(f"inputs[{i}] has {values.size} values; the model expects {width}")
        if not np.all(np.isfinite(values)):
            raise UserError(f"inputs[{i}] contains a value that is not a finite number")
        rows.append(values.reshape(shape))
    batch = np.stack(rows)
    if loaded.features is not None:
        batch = loaded.features.apply(batch)
    return torch.from_numpy(batch.astype(np.float32))


def decode_outputs(loaded: LoadedModel, outputs: np.ndarray) -> list[dict]:
    """Model outputs as predictions a person can read."""
    sig = loaded.signature
    if sig["task"] == REGRESSION or sig["task"] == FORECASTING:
        values = outputs.reshape(len(outputs), -1)
        if loaded.targets is not None:
            values = loaded.targets.invert(values)
        if sig["task"] == REGRESSION:
            return [{"value": float(v[0])} for v in values]
        return [{"values": [float(x) for x in v]} for v in values]
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    classes = sig.get("classes") or list(range(outputs.shape[1]))
    return [
        {"class": classes[int(p.argmax())], "index": int(p.argmax()), "probabilities": [float(x) for x in p]}
        for p in probabilities
    ]


def cached(digest: str, device: str = "cpu") -> bool:
    """Whether the model of the checkpoint with sha256 ``digest`` is in this process's cache."""
    with _cache_lock:
        return (digest, str(resolve_device(device))) in _cache


def predict(checkpoint: bytes | Callable[[], bytes], inputs: list, *, device: str = "cpu",
            digest: str | None = None, explain: dict | None = None) -> dict:
    """Predictions for raw ``inputs`` from the model in ``checkpoint``: ``{"predictions": [...]}``.

    ``checkpoint`` may be a function returning the bytes, called only when ``digest`` (the
    checkpoint's sha256) is not in the cache. With ``explain`` (``{"method", "steps"}``) each
    prediction also carries an ``explanation`` (see :mod:`worker.ml.explain`).
    """
    target = resolve_device(device)
    try:
        return _predict(checkpoint, inputs, target, digest, explain)
    except torch.cuda.OutOfMemoryError:
        pass  # leave the except block first, so the traceback's frames can free their tensors
    raise out_of_memory(None, target)


def _predict(checkpoint, inputs: list, device: torch.device, digest: str | None, explain: dict | None) -> dict:
    if not inputs:
        return {"predictions": []}
    loaded = load_model(checkpoint, device, digest=digest)
    batch = encode_inputs(loaded, inputs)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(batch), BATCH_SIZE):
            outputs.append(loaded.network(batch[start:start + BATCH_SIZE].to(device)).float().cpu())
    raw = torch.cat(outputs).numpy().astype(np.float64)
    predictions = decode_outputs(loaded, raw)
    if explain:
        from worker.ml import explain as explaining  # Captum loads only when someone asks

        for prediction, explanation in zip(predictions, explaining.explain(loaded, batch, raw, **explain)):
            prediction["explanation"] = explanation
    return {"predictions": predictions}
