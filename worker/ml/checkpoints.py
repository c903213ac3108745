"""Checkpoints as one safetensors file: tensors for state, JSON strings in the header for the rest.

Nothing is pickled, so reading a checkpoint cannot run code. Tensor names:
``model.*`` (weights), ``best_model.*`` (best weights when they differ from ``model.*``),
``optimizer.<param>.<name>`` (optimizer state), ``rng.torch`` / ``rng.cuda.<i>`` (generator
states), ``normalizer.{features,targets}.{mean,std}`` and ``normalizer.tfidf.idf`` (TF-IDF text features). Header metadata keys: ``format``,
``signature``, ``spec``, ``training`` (position, best metric, early stopping), ``optimizer``
(param groups and non-tensor state), ``scheduler`` (its state_dict), ``vocabulary`` (a text classifier's words, or its TF-IDF n-grams)
``tokenizer`` (a text generator's character, word or BPE tokenizer, or a text classifier's BPE,
as JSON; its sha256 is the signature's ``tokenizer_sha256``) and ``wide_terms`` (the word n-grams
of a text classifier's wide path).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError, deserialize
from safetensors.torch import load as load_tensors

from app.jobs.errors import UserError
from worker.ml.preparation import SavedText, Standardizer
from worker.ml.text import Tokenizer

FORMAT = "kiln-checkpoint/1"
# Header metadata that holds JSON, and whether every checkpoint has it.
_JSON_METADATA = {"signature": True, "spec": True, "training": False, "optimizer": False, "scheduler": False,
                  "vocabulary": False, "tokenizer": False, "wide_terms": False}


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
    # A text classifier's wide path: the word n-grams it reads (their idf is in the model's weights).
    wide_terms: list[str] | None = None

    @property
    def served_weights(self) -> dict[str, torch.Tensor]:
        """The weights a model version registered from this checkpoint serves: the best epoch's.

        A model version names its job's best checkpoint; when the best epoch was not checkpointed
        (``every_epochs`` above 1, early stopping), that is the last one, which carries the best
        weights apart (``best_model``) from the weights training ended with (``model``).
        """
        return self.best_model if self.best_model is not None else self.model


# safetensors' names of the dtypes a checkpoint can hold.
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
for _torch_name, _safetensors_name in (("uint64", "U64"), ("uint32", "U32"), ("uint16", "U16"),
                                       ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _torch_name):
        _DTYPE_NAMES[getattr(torch, _torch_name)] = _safetensors_name


class Encoded:
    """A checkpoint in the safetensors layout, held as its header and the tensors it describes.

    Iterating it yields the file's bytes in chunks: the header, then each tensor's own memory, so a
    writer hashes and writes them without a joined copy (``hashlib`` and file writes release the
    GIL on large buffers, so a writer thread barely holds up training). ``bytes(encoded)`` joins
    them where the whole is needed. The tensors must not change until it is written: see
    :func:`host_copy`.
    """

    def __init__(self, header: bytes, tensors: list[torch.Tensor]):
        self.header = header
        self.tensors = tensors
        self.size = len(header) + sum(t.nbytes for t in tensors)

    @classmethod
    def of(cls, checkpoint: "Checkpoint") -> "Encoded":
        """Lay ``checkpoint`` out without copying its tensors (a GPU tensor is copied to the CPU)."""
        tensors, metadata = _parts(checkpoint)
        # Wider types first, each group by name: every tensor starts at a multiple of its item size
        # (the header is padded to 8 bytes), as safetensors itself lays them out.
        order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for name in order:
            tensor = tensors[name]
            if tensor.dtype not in _DTYPE_NAMES:
                raise ValueError(f"cannot store {name} of dtype {tensor.dtype} in a checkpoint")
            header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return cls(struct.pack("<Q", len(text)) + text, [tensors[name] for name in order])

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[memoryview]:
        yield memoryview(self.header)
        for tensor in self.tensors:
            if tensor.numel():
                yield memoryview(tensor.reshape(-1).view(torch.uint8).numpy())

    def __bytes__(self) -> bytes:
        return b"".join(self)


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of ``tensor`` that nothing else holds (a checkpoint taken while training goes on)."""
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _on_host(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _parts(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The checkpoint's tensors by stored name (on the CPU, contiguous) and its header metadata."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, group in (("model", checkpoint.model), ("best_model", checkpoint.best_model or {}),
                          ("rng", checkpoint.rng), ("normalizer", checkpoint.normalizer)):
        for key, tensor in group.items():
            tensors[f"{prefix}.{key}"] = _on_host(tensor)
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
                    tensors[f"optimizer.{index}.{name}"] = _on_host(value)
                else:
                    scalars.setdefault(str(index), {})[name] = value
        metadata["optimizer"] = json.dumps({"param_groups": checkpoint.optimizer["param_groups"], "scalars": scalars})
    if checkpoint.scheduler is not None:
        metadata["scheduler"] = json.dumps(checkpoint.scheduler)
    if checkpoint.vocabulary is not None:
        metadata["vocabulary"] = json.dumps(checkpoint.vocabulary)
    if checkpoint.tokenizer is not None:
        metadata["tokenizer"] = checkpoint.tokenizer
    if checkpoint.wide_terms is not None:
        metadata["wide_terms"] = json.dumps(checkpoint.wide_terms)
    return tensors, metadata


def encode(checkpoint: Checkpoint) -> bytes:
    """The checkpoint as safetensors bytes."""
    return bytes(Encoded.of(checkpoint))


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
        wide_terms=json.loads(metadata["wide_terms"]) if "wide_terms" in metadata else None,
    )


def text_entries(data) -> dict:
    """The ``vocabulary``, ``tokenizer`` and ``wide_terms`` entries of a checkpoint of a run on ``data`` (a PreparedData)."""
    wide_terms = data.word_ngrams.terms if getattr(data, "word_ngrams", None) is not None else None
    return {**_encoding_entries(data), "wide_terms": wide_terms}


def _encoding_entries(data) -> dict:
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
    return SavedText(saved.vocabulary, saved.tokenizer, idf.numpy() if idf is not None else None, saved.wide_terms,
                     saved.signature.get("wide_width"), saved.signature.get("tfidf_words", "kiln"))


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
