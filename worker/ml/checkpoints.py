"""Checkpoints as one safetensors file: tensors for state, JSON strings in the header for the rest.

Nothing is pickled, so reading a checkpoint cannot run code. Tensor names:
``model.*`` (weights), ``best_model.*`` (best weights when they differ from ``model.*``),
``optimizer.<param>.<name>`` (optimizer state), ``rng.torch`` / ``rng.cuda.<i>`` (generator
states), ``normalizer.{features,targets}.{mean,std}`` and ``normalizer.tfidf.idf`` (TF-IDF text features). Header metadata keys: ``format``,
``signature``, ``spec``, ``training`` (position, best metric, early stopping), ``optimizer``
(param groups and non-tensor state), ``scheduler`` (its state_dict), ``vocabulary`` (a text classifier's words, or its TF-IDF n-grams)
and ``tokenizer`` (a text generator's character, word or BPE tokenizer, or a text classifier's BPE,
as JSON; its sha256 is the signature's ``tokenizer_sha256``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError, deserialize
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from app.jobs.errors import UserError
from worker.ml.preparation import SavedText, Standardizer
from worker.ml.text import Tokenizer

FORMAT = "kiln-checkpoint/1"
# Header metadata that holds JSON, and whether every checkpoint has it.
_JSON_METADATA = {"signature": True, "spec": True, "training": False, "optimizer": False, "scheduler": False,
                  "vocabulary": False, "tokenizer": False}


class UnreadableCheckpoint(UserError):
    """Checkpoint bytes that do not parse: truncated, not safetensors, or not a Kiln checkpoint."""


@dataclass
class Checkpoint:
    """Everything one checkpoint holds, in memory."""

    model: dict[str, torch.Tensor]
    signature: dict
    spec: dict
    training: dict = field(default_factory=dict)
    optimizer: dict | None = None
    scheduler: dict | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    best_model: dict[str, torch.Tensor] | None = None
    normalizer: dict[str, torch.Tensor] = field(default_factory=dict)
    vocabulary: list[str] | None = None
    # A text generator's tokenizer as its JSON document (its sha256 is in the signature).
    tokenizer: str | None = None

    @property
    def served_weights(self) -> dict[str, torch.Tensor]:
        """The weights a model version registered from this checkpoint serves: the best epoch's.

        A model version names its job's best checkpoint; when the best epoch was not checkpointed
        (``every_epochs`` above 1, early stopping), that is the last one, which carries the best
        weights apart (``best_model``) from the weights training ended with (``model``).
        """
        return self.best_model if self.best_model is not None else self.model


class _Packed(dict):
    """Tensors as safetensors accepts them: on the CPU, contiguous, no two sharing storage.

    A tensor is copied only when it has to be (on a GPU, strided, or sharing storage with one
    already packed, as tied weights do): :func:`encode` serialises before it returns, so the bytes
    are the snapshot, and copying every tensor first would only double the work.
    """

    def __init__(self):
        super().__init__()
        self._storages: set[tuple[str, int]] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if storage in self._storages and tensor.numel():
            tensor = tensor.clone()
            storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        self._storages.add(storage)
        self[name] = tensor

    def add_all(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            self.add(f"{prefix}.{key}", tensor)


def encode(checkpoint: Checkpoint) -> bytes:
    """The checkpoint as safetensors bytes."""
    tensors = _Packed()
    tensors.add_all("model", checkpoint.model)
    if checkpoint.best_model is not None:
        tensors.add_all("best_model", checkpoint.best_model)
    tensors.add_all("rng", checkpoint.rng)
    tensors.add_all("normalizer", checkpoint.normalizer)
    metadata = {
        "format": FORMAT,
        "signature": json.dumps(checkpoint.signature),
        "spec": json.dumps(checkpoint.spec),
        "training": json.dumps(checkpoint.training),
    }
    if checkpoint.optimizer is not None:
        scalars: dict[str, dict] = {}
        for index, values in checkpoint.optimizer["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors.add(f"optimizer.{index}.{name}", value)
                else:
                    scalars.setdefault(str(index), {})[name] = value
        metadata["optimizer"] = json.dumps({"param_groups": checkpoint.optimizer["param_groups"], "scalars": scalars})
    if checkpoint.scheduler is not None:
        metadata["scheduler"] = json.dumps(checkpoint.scheduler)
    if checkpoint.vocabulary is not None:
        metadata["vocabulary"] = json.dumps(checkpoint.vocabulary)
    if checkpoint.tokenizer is not None:
        metadata["tokenizer"] = checkpoint.tokenizer
    return save_tensors(dict(tensors), metadata=metadata)


def read_metadata(data: bytes) -> dict[str, str]:
    """The header metadata of safetensors bytes, without reading any tensor."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        metadata = header.get("__metadata__") or {}
    except (struct.error, ValueError, UnicodeDecodeError, AttributeError):
        raise UnreadableCheckpoint("the checkpoint is not a safetensors file") from None
    if metadata.get("format") != FORMAT:
        raise UnreadableCheckpoint(f"the checkpoint is not a Kiln checkpoint (format {metadata.get('format')!r})")
    return metadata


def check(data: bytes) -> None:
    """Raise UnreadableCheckpoint unless ``data`` parses whole: header, every tensor's bytes, JSON metadata.

    A sha256 that matches proves the bytes are the ones recorded, not that they were complete
    when recorded; this is what tells a cut-short file from a good one before training reads it.
    """
    metadata = read_metadata(data)
    try:
        deserialize(data)  # safetensors' own parser, no torch: offsets must cover the data exactly
    except SafetensorError as exc:
        raise UnreadableCheckpoint(f"the checkpoint's tensor data does not parse ({exc})") from None
    for key, required in _JSON_METADATA.items():
        if key not in metadata:
            if required:
                raise UnreadableCheckpoint(f"the checkpoint has no {key!r} entry")
            continue
        try:
            json.loads(metadata[key])
        except ValueError:
            raise UnreadableCheckpoint(f"the checkpoint's {key!r} entry is not valid JSON") from None


def signature_of(data: bytes) -> dict:
    """The model signature stored in a checkpoint."""
    return json.loads(read_metadata(data)["signature"])


def decode(data: bytes) -> Checkpoint:
    """A checkpoint from safetensors bytes written by :func:`encode`."""
    metadata = read_metadata(data)
    tensors = load_tensors(data)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        prefix, _, rest = name.partition(".")
        groups.setdefault(prefix, {})[rest] = tensor
    optimizer = None
    if "optimizer" in metadata:
        saved = json.loads(metadata["optimizer"])
        state: dict[int, dict] = {}
        for key, tensor in groups.get("optimizer", {}).items():
            index, _, name = key.partition(".")
            state.setdefault(int(index), {})[name] = tensor
        for index, values in saved["scalars"].items():
            state.setdefault(int(index), {}).update(values)
        for group in saved["param_groups"]:
            if isinstance(group.get("betas"), list):  # JSON turned the tuple into a list
                group["betas"] = tuple(group["betas"])
        optimizer = {"state": state, "param_groups": saved["param_groups"]}
    return Checkpoint(
        model=groups.get("model", {}),
        signature=json.loads(metadata["signature"]),
        spec=json.loads(metadata["spec"]),
        training=json.loads(metadata.get("training", "{}")),
        optimizer=optimizer,
        scheduler=json.loads(metadata["scheduler"]) if "scheduler" in metadata else None,
        rng=groups.get("rng", {}),
        best_model=groups.get("best_model"),
        normalizer=groups.get("normalizer", {}),
        vocabulary=json.loads(metadata["vocabulary"]) if "vocabulary" in metadata else None,
        tokenizer=metadata.get("tokenizer"),
    )


def text_entries(data) -> dict:
    """The ``vocabulary`` and ``tokenizer`` entries of a checkpoint of a run on ``data`` (a PreparedData)."""
    if data.featurizer is not None:
        return {"vocabulary": data.featurizer.ngrams, "tokenizer": None}
    if isinstance(data.tokenizer, Tokenizer):
        return {"vocabulary": data.tokenizer.vocabulary, "tokenizer": None}
    if data.tokenizer is not None:
        return {"vocabulary": None, "tokenizer": data.tokenizer.to_json()}
    return {"vocabulary": None, "tokenizer": data.codec.to_json() if data.codec is not None else None}


def saved_text(saved: Checkpoint) -> SavedText:
    """A checkpoint's text encoding (words, BPE or TF-IDF), to resume with instead of fitting again."""
    idf = saved.normalizer.get("tfidf.idf")
    return SavedText(saved.vocabulary, saved.tokenizer, idf.numpy() if idf is not None else None)


def pack_standardizers(features: Standardizer | None, targets: Standardizer | None,
                       featurizer=None) -> dict[str, torch.Tensor]:
    """Normaliser statistics (and TF-IDF idf weights) as float64 tensors for the checkpoint."""
    packed = {}
    if featurizer is not None:
        packed["tfidf.idf"] = torch.from_numpy(np.asarray(featurizer.idf, dtype=np.float64))
    for role, scale in (("features", features), ("targets", targets)):
        if scale is not None:
            packed[f"{role}.mean"] = torch.from_numpy(np.asarray(scale.mean, dtype=np.float64))
            packed[f"{role}.std"] = torch.from_numpy(np.asarray(scale.std, dtype=np.float64))
    return packed


def unpack_standardizers(packed: dict[str, torch.Tensor]) -> tuple[Standardizer | None, Standardizer | None]:
    """Feature and target normalisers from checkpoint tensors (None where not normalised)."""
    found = []
    for role in ("features", "targets"):
        if f"{role}.mean" in packed:
            found.append(Standardizer(packed[f"{role}.mean"].numpy(), packed[f"{role}.std"].numpy()))
        else:
            found.append(None)
    return found[0], found[1]
