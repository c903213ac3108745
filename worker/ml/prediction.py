"""Prediction from a checkpoint: raw rows in, class labels or values in original units out.

Loaded models stay in a small LRU serving cache keyed by the checkpoint's sha256 (and device),
so a prediction worker answering many requests for one model reads its checkpoint once. The cache
is bounded by count and by the bytes of the models' parameters and buffers (:func:`configure_cache`).
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

from app.catalog import GENERATIVE_TASKS
from app.jobs.errors import UserError
from app.jobs.schemas import ModelConfig, PretrainedConfig
from worker.ml import checkpoints, pretrained, text_codecs
from worker.ml.architectures import ModelShape, build_model
from worker.ml.devices import out_of_memory, resolve_device
from worker.ml.preparation import FORECASTING, REGRESSION, Standardizer
from worker.ml.progress import load_weights
from worker.ml.text import TfidfFeaturizer, Tokenizer, WithWordNgrams, WordNgrams

CACHE_SIZE = 8  # defaults; a worker sets its own from settings with configure_cache
CACHE_BYTES = 2 * 1024**3
BATCH_SIZE = 1024
_model_config = TypeAdapter(ModelConfig)
# The text classifiers that may have a wide path (``model.wide``); the generators read tokens too but have none.
_WIDE_ARCHITECTURES = ("mlp", "rnn", "lstm", "gru", "transformer", "cnn1d")


@dataclass
class LoadedModel:
    """A network ready to serve, with what it needs to encode inputs and decode outputs."""

    network: torch.nn.Module
    signature: dict
    features: Standardizer | None
    targets: Standardizer | None
    # Word or BPE tokenizer, TF-IDF featurizer (worker.ml.text), or a text generator's codec (worker.ml.text_codecs).
    tokenizer: Tokenizer | object | None
    device: torch.device

    @property
    def size_bytes(self) -> int:
        """Bytes of the network's parameters and buffers (what the cache keeps in memory)."""
        tensors = list(self.network.parameters()) + list(self.network.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)


_cache: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
_cache_sizes: dict[tuple[str, str], int] = {}
_cache_lock = threading.Lock()
_limits = {"models": CACHE_SIZE, "bytes": CACHE_BYTES}


def configure_cache(*, models: int, max_bytes: int) -> None:
    """Bound the serving cache to ``models`` models and ``max_bytes`` bytes, evicting what no longer fits."""
    with _cache_lock:
        _limits["models"], _limits["bytes"] = models, max_bytes
        _shrink()


def cache_keys() -> list[tuple[str, str]]:
    """The cached (sha256, device) keys, least recently used first."""
    with _cache_lock:
        return list(_cache)


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
    model = sig["model"]
    if (sig["input_kind"] in ("tokens", "tfidf") and model.get("arch") in _WIDE_ARCHITECTURES
            and not any(name.startswith("wide.") for name in saved.served_weights)):
        # Saved before the wide path existed (a default now), or (mlp + tfidf) before it had one.
        model = {**model, "wide": False}
    config = _model_config.validate_python(model)
    if sig["input_kind"] == pretrained.INPUT_KIND:
        pretrained.check_base(sig)
    network = build_model(config, ModelShape.from_signature(sig))
    load_weights(network, saved.served_weights, "prediction")
    tokenizer = None
    if sig["input_kind"] == "tfidf":  # TF-IDF features: the training split's n-grams and idf weights
        tokenizer = TfidfFeaturizer(saved.vocabulary, saved.normalizer["tfidf.idf"].numpy(), config.tfidf.ngram_max,
                                    config.tfidf.sublinear_tf, sig.get("tfidf_words", "kiln"))
    elif saved.vocabulary is not None:
        tokenizer = Tokenizer(saved.vocabulary, int(sig["max_tokens"]))
    if sig.get("tokenizer_sha256"):  # a text generator's codec, or a BPE, checked against the signature
        if saved.tokenizer is None:
            raise UserError("the checkpoint of this text model has no tokenizer")
        tokenizer = text_codecs.from_json(saved.tokenizer, sig["tokenizer_sha256"])
    if sig.get("wide_terms"):  # the wide path's word n-grams follow the token ids
        tokenizer = WithWordNgrams(tokenizer, WordNgrams(saved.wide_terms, config.wide_ngram_max, int(sig["wide_width"])))
    if sig["input_kind"] == pretrained.INPUT_KIND:
        network.merge_adapters()
        tokenizer = pretrained.PretrainedTokenizer(config.base, int(sig["max_length"]))
    network.to(device).eval()
    features, targets = checkpoints.unpack_standardizers(saved.normalizer)
    loaded = LoadedModel(network, sig, features, targets, tokenizer, device)
    _remember(key, loaded)
    return loaded


def _remember(key: tuple[str, str], loaded: LoadedModel) -> None:
    size = loaded.size_bytes
    with _cache_lock:
        if size > _limits["bytes"]:
            return  # served this once, but keeping it would push out everything else
        _cache[key], _cache_sizes[key] = loaded, size
        _cache.move_to_end(key)
        _shrink()


def _shrink() -> None:
    # Caller holds _cache_lock.
    while _cache and (len(_cache) > _limits["models"] or sum(_cache_sizes.values()) > _limits["bytes"]):
        key, _ = _cache.popitem(last=False)
        del _cache_sizes[key]


def load_catalog_model(name: str, device: torch.device) -> LoadedModel:
    """A catalog encoder as it ships (no fine-tuning), for embeddings; cached like a checkpoint."""
    key = (f"pretrained:{name}", str(device))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    entry, _ = pretrained.locate(name)
    config = PretrainedConfig(arch="pretrained", base=name, max_length=entry.max_length)
    network = pretrained.build_network(config, 1).to(device).eval()
    sig = {"input_kind": pretrained.INPUT_KIND, "task": "embedding", "base": name, "max_length": entry.max_length}
    loaded = LoadedModel(network, sig, None, None, pretrained.PretrainedTokenizer(name, entry.max_length), device)
    _remember(key, loaded)
    return loaded


def evict(digest: str) -> int:
    """Forget the cached models of the checkpoint with sha256 ``digest`` (every device); returns how many."""
    with _cache_lock:
        keys = [key for key in _cache if key[0] == digest]
        for key in keys:
            del _cache[key], _cache_sizes[key]
    return len(keys)


def clear_cache() -> None:
    """Forget every cached model (tests, or a worker freeing memory)."""
    with _cache_lock:
        _cache.clear()
        _cache_sizes.clear()


def encode_inputs(loaded: LoadedModel, inputs: list) -> torch.Tensor:
    """Raw rows as the model's input tensor, normalised with the training statistics."""
    sig = loaded.signature
    if sig["input_kind"] == "image":
        return _encode_images(loaded, inputs)
    if sig["input_kind"] in ("tokens", "tfidf", pretrained.INPUT_KIND):
        for i, row in enumerate(inputs):
            if not isinstance(row, str):
                raise UserError(f"inputs[{i}] must be a text string; this model classifies text")
        if sig["input_kind"] == "tfidf":
            return torch.from_numpy(loaded.tokenizer.transform(inputs))
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


def _encode_images(loaded: LoadedModel, inputs: list) -> torch.Tensor:
    """Base64 PNG or JPEG inputs through the evaluation transforms: decode, resize, normalise."""
    from app import images as image_rules
    from worker.ml import images

    channels, side = int(loaded.signature["channels"]), int(loaded.signature["image_size"])
    rows = []
    for i, row in enumerate(inputs):
        if not isinstance(row, str):
            raise UserError(f"inputs[{i}] must be a base64 PNG or JPEG string; this model classifies images")
        try:
            encoded = image_rules.decode_input(row, f"inputs[{i}]")
        except image_rules.ImageError as exc:
            raise UserError(str(exc)) from None
        rows.append(images.to_pixels(encoded, f"inputs[{i}]", channels, side).numpy())
    batch = np.stack(rows).astype(np.float64)
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


def predict(checkpoint: bytes | Callable[[], bytes] | None, inputs: list, *, device: str = "cpu",
            digest: str | None = None, output: str = "prediction", compare_with: list[str] | None = None,
            base: str | None = None, explain: dict | None = None) -> dict:
    """Predictions for raw ``inputs`` from the model in ``checkpoint``: ``{"predictions": [...]}``.

    ``checkpoint`` may be a function returning the bytes, called only when ``digest`` (the
    checkpoint's sha256) is not in the cache. With ``explain`` (``{"method", "steps"}``) each
    prediction also carries an ``explanation`` (see :mod:`worker.ml.explain`). ``output="embedding"``
    gives unit-norm sentence embeddings instead (pretrained models; with ``checkpoint=None``, the
    catalog model ``base`` as it ships), and with ``compare_with`` the cosine similarity of each
    input to each of those texts.
    """
    target = resolve_device(device)
    try:
        if output == "embedding":
            loaded = (load_model(checkpoint, target, digest=digest) if checkpoint is not None
                      else load_catalog_model(base, target))
            return _embed(loaded, inputs, compare_with)
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


def generate(checkpoint: bytes | Callable[[], bytes], prompts: list, sampling, *, device: str = "cpu",
             digest: str | None = None, on_text: Callable[[int, str], None] | None = None) -> dict:
    """Text from a causal_lm or seq2seq checkpoint for each prompt (``worker.ml.generation``)."""
    from worker.ml import generation

    target = resolve_device(device)
    try:
        loaded = load_model(checkpoint, target, digest=digest)
        if loaded.signature.get("task") not in GENERATIVE_TASKS:
            raise UserError("prompt and text generation need a causal_lm or seq2seq model")
        return generation.generate(loaded, prompts, sampling, on_text=on_text)
    except torch.cuda.OutOfMemoryError:
        pass
    raise out_of_memory(None, target)


def _embeddings(loaded: LoadedModel, texts: list) -> torch.Tensor:
    batch = encode_inputs(loaded, texts)
    parts = []
    with torch.no_grad():
        for start in range(0, len(batch), BATCH_SIZE):
            parts.append(loaded.network.embed(batch[start:start + BATCH_SIZE].to(loaded.device)).cpu())
    return torch.cat(parts)


def _embed(loaded: LoadedModel, inputs: list, compare_with: list[str] | None) -> dict:
    if loaded.signature["input_kind"] != pretrained.INPUT_KIND:
        raise UserError("output: embedding needs a pretrained model (arch pretrained, or pretrained:<name>)")
    vectors = _embeddings(loaded, inputs)
    result: dict = {"embeddings": vectors.double().tolist()}
    if compare_with:
        # Unit vectors: the dot product is the cosine similarity.
        result["similarities"] = (vectors @ _embeddings(loaded, compare_with).T).double().tolist()
    return result


@dataclass
class BatchOutcome:
    """Per-request results of one batched forward pass: a prediction dict, or the request's UserError."""

    results: list[dict | UserError]
    forward_passes: int


def predict_many(checkpoint: bytes | Callable[[], bytes], requests: list[list], *, device: str = "cpu",
                 digest: str | None = None) -> BatchOutcome:
    """Predictions for several requests' ``inputs`` in one forward pass, split back per request.

    Each request's rows are encoded on their own, so a request with a bad row gets its UserError
    and the others still run; the valid rows go through the network together (in slices of
    ``BATCH_SIZE``, as :func:`predict` does), so each result equals what :func:`predict` gives alone.
    """
    target = resolve_device(device)
    try:
        return _predict_many(checkpoint, requests, target, digest)
    except torch.cuda.OutOfMemoryError:
        pass
    raise out_of_memory(None, target)


def _predict_many(checkpoint, requests: list[list], device: torch.device, digest: str | None) -> BatchOutcome:
    loaded = load_model(checkpoint, device, digest=digest)
    results: list[dict | UserError] = [{"predictions": []} for _ in requests]
    encoded: list[tuple[int, torch.Tensor]] = []
    for index, inputs in enumerate(requests):
        if not inputs:
            continue
        try:
            encoded.append((index, encode_inputs(loaded, inputs)))
        except UserError as exc:
            results[index] = exc
    if not encoded:
        return BatchOutcome(results, 0)
    batch = torch.cat([tensor for _, tensor in encoded])
    outputs, passes = [], 0
    with torch.no_grad():
        for start in range(0, len(batch), BATCH_SIZE):
            outputs.append(loaded.network(batch[start:start + BATCH_SIZE].to(device)).float().cpu())
            passes += 1
    merged = torch.cat(outputs).numpy().astype(np.float64)
    offset = 0
    for index, tensor in encoded:
        results[index] = {"predictions": decode_outputs(loaded, merged[offset:offset + len(tensor)])}
        offset += len(tensor)
    return BatchOutcome(results, passes)


def predict_rows(checkpoint: bytes | Callable[[], bytes], rows: list, *, device: str = "cpu",
                 digest: str | None = None) -> list[dict]:
    """One chunk of a batch file: per row ``{"prediction": ...}`` or ``{"error": ...}``, in order.

    The chunk runs as one forward pass; only when a row is refused are rows encoded one by one,
    so a bad row costs its own error and not the chunk's.
    """
    target = resolve_device(device)
    try:
        outcome = _predict_many(checkpoint, [rows], target, digest)
        if not isinstance(outcome.results[0], UserError):
            return [{"prediction": p} for p in outcome.results[0]["predictions"]]
        outcome = _predict_many(checkpoint, [[row] for row in rows], target, digest)
    except torch.cuda.OutOfMemoryError:
        pass
    else:
        return [{"error": str(r).replace("inputs[0]", "row")} if isinstance(r, UserError)
                else {"prediction": r["predictions"][0]} for r in outcome.results]
    raise out_of_memory(None, target)
