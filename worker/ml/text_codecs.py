"""Tokenizers of the text generators, and their training data: token windows or (source, target) pairs.

Decisions a user may notice:
- ``causal_lm`` reads a text column (default ``text``); the seeded row split keeps whole texts in one
  part; each part's texts are joined with a blank line and cut into contiguous, non-overlapping
  windows of ``block_size + 1`` tokens (inputs, and the same tokens shifted by one as targets).
- Tokenizers are trained on the training part only: characters (unknown ones map to id 0), or a
  byte-level BPE from the ``tokenizers`` library, which never meets an unknown byte.
- ``seq2seq`` reads ``dataset.text_column`` as the source and ``dataset.target`` as the target
  text; both share one vocabulary (whitespace words or characters) with pad, start, end and unknown.
- A codec is saved in the checkpoint as JSON; its sha256 is the signature's ``tokenizer_sha256``.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from app.catalog import LANGUAGE_MODELING, SEQUENCE_TO_SEQUENCE
from app.jobs.errors import UserError
from app.jobs.schemas import DatasetRef
from worker.ml.datasets import Table, split_indices
from worker.ml.text import SubwordTokenizer, train_subword

# A blank line separates the texts of a corpus, as paragraphs.
DOCUMENT_SEPARATOR = "\n\n"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


class CharCodec:
    """Characters of the training text; id 0 stands for any character it never saw."""

    kind = "char"

    def __init__(self, symbols: list[str], specials: list[str] | None = None):
        self.specials = specials if specials is not None else ["<unk>"]
        self.symbols = symbols
        self._ids = {c: i + len(self.specials) for i, c in enumerate(symbols)}
        self.unknown = len(self.specials) - 1

    @classmethod
    def train(cls, texts: list[str], specials: list[str] | None = None) -> "CharCodec":
        """The sorted set of characters of ``texts``."""
        return cls(sorted(set("".join(texts))), specials)

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return len(self.specials) + len(self.symbols)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text``."""
        return [self._ids.get(c, self.unknown) for c in text]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special ids are dropped)."""
        n = len(self.specials)
        return "".join(self.symbols[i - n] for i in ids if i >= n)

    def to_json(self) -> str:
        """The codec as a JSON document."""
        return json.dumps({"kind": self.kind, "specials": self.specials, "symbols": self.symbols})


class WordCodec(CharCodec):
    """Whitespace-separated words of the training text (seq2seq); decoding joins them with spaces."""

    kind = "word"

    @classmethod
    def train(cls, texts: list[str], specials: list[str] | None = None) -> "WordCodec":
        """The sorted set of words of ``texts``."""
        return cls(sorted({w for t in texts for w in t.split()}), specials)

    def encode(self, text: str) -> list[int]:
        """Ids of the words of ``text``."""
        return [self._ids.get(w, self.unknown) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        """Words of ``ids`` joined by spaces."""
        n = len(self.specials)
        return " ".join(self.symbols[i - n] for i in ids if i >= n)


class BpeCodec:
    """Byte-level BPE trained by the ``tokenizers`` library on the training text."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "BpeCodec":
        """A BPE of at most ``vocab_size`` ids over the bytes of ``texts``."""
        return cls(train_subword(texts, kind="bpe", vocab_size=vocab_size))

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``."""
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (an incomplete UTF-8 sequence decodes to U+FFFD)."""
        return self.tokenizer.decode(list(ids))

    def to_json(self) -> str:
        """The codec as a JSON document (the library's own serialisation inside)."""
        return json.dumps({"kind": self.kind, "tokenizer": self.tokenizer.to_str()})


def sha256_of(document: str) -> str:
    """The sha256 of a codec's JSON document, as recorded in the signature."""
    return hashlib.sha256(document.encode()).hexdigest()


def from_json(document: str, expected_sha256: str | None = None):
    """The codec of a JSON document, refused (UserError) when its sha256 is not the recorded one."""
    if expected_sha256 is not None and sha256_of(document) != expected_sha256:
        raise UserError("the checkpoint's tokenizer does not match the sha256 its signature records")
    saved = json.loads(document)
    if saved["kind"] == "subword-bpe":  # a text classifier's tokenizer
        return SubwordTokenizer.from_json(document)
    if saved["kind"] == "bpe":
        from tokenizers import Tokenizer

        return BpeCodec(Tokenizer.from_str(saved["tokenizer"]))
    return {"char": CharCodec, "word": WordCodec}[saved["kind"]](saved["symbols"], saved["specials"])


def _texts(table: Table, column: str | None, default: str, role: str) -> tuple[str, list[str]]:
    frame = table.frame
    name = column or default
    if name not in frame.columns:
        shown = ", ".join(repr(c) for c in list(frame.columns)[:50])
        raise UserError(f"unknown {role} column {name!r}; name it in dataset.{'text_column' if role == 'text' else 'target'} "
                        f"(the dataset has columns: {shown})")
    return name, frame[name].fillna("").astype(str).tolist()


def _parts(n: int, dataset: DatasetRef) -> dict[str, np.ndarray]:
    train, val, test = split_indices(n, dataset.split)
    if len(train) == 0:
        raise UserError(f"too few rows ({n}) to leave any for training after the validation and test split")
    return {"train": train, "val": val, "test": test}


def prepare_generative(dataset: DatasetRef, table: Table, model, task: str):
    """Encoded splits and signature of a language-modeling or sequence-to-sequence job."""
    from worker.ml.preparation import PreparedData

    arch = getattr(model, "arch", None)
    wanted = {"causal_lm": LANGUAGE_MODELING, "seq2seq": SEQUENCE_TO_SEQUENCE}.get(arch)
    if wanted is None or task != wanted:
        raise UserError(f"{task} datasets are trained with arch {'causal_lm' if task == LANGUAGE_MODELING else 'seq2seq'}"
                        if wanted is None else f"arch {arch} trains {wanted} datasets, not {task}")
    if dataset.window is not None or dataset.features or dataset.image_column is not None:
        raise UserError("a text generator reads text columns only; drop dataset.window, features and image_column")
    if task == LANGUAGE_MODELING:
        return _prepare_lm(dataset, table, model, PreparedData)
    return _prepare_seq2seq(dataset, table, model, PreparedData)


def _prepare_lm(dataset: DatasetRef, table: Table, model, PreparedData):
    if dataset.target is not None:
        raise UserError("language modeling has no target column; it predicts the text itself (drop dataset.target)")
    column, texts = _texts(table, dataset.text_column, "text", "text")
    parts = _parts(len(texts), dataset)
    joined = {name: DOCUMENT_SEPARATOR.join(texts[i] for i in idx) for name, idx in parts.items()}
    codec = (BpeCodec.train([texts[i] for i in parts["train"]], model.vocab_size) if model.tokenizer == "bpe"
             else CharCodec.train([joined["train"]]))
    window = model.block_size + 1
    splits = {}
    for name, text in joined.items():
        ids = np.asarray(codec.encode(text), dtype=np.int64)
        count = (len(ids) - 1) // model.block_size if len(ids) >= window else 0
        if name == "train" and count == 0:
            raise UserError(f"the training text has {len(ids)} tokens, fewer than block_size + 1 = {window}; "
                            "use a smaller block_size or more text")
        windows = np.stack([ids[i * model.block_size:i * model.block_size + window] for i in range(count)]) \
            if count else np.zeros((0, window), dtype=np.int64)
        splits[name] = (np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:]))
    document = codec.to_json()
    signature = {
        "input_kind": "tokens", "input_shape": [model.block_size], "sequence_shape": [model.block_size, 1],
        "num_outputs": codec.vocab_size, "vocab_size": codec.vocab_size, "classes": None, "target": None,
        "feature_names": [column], "text_column": column, "block_size": model.block_size,
        "tokenizer": codec.kind, "tokenizer_sha256": sha256_of(document),
        "tokens": {name: int(x.size) for name, (x, _) in splits.items()},
    }
    return PreparedData(LANGUAGE_MODELING, splits, signature, codec=codec)


def encode_source(codec, text: str, max_tokens: int) -> list[int]:
    """A source text's ids, cut to leave room for the end id that closes it."""
    return codec.encode(text)[:max_tokens - 1] + [EOS_ID]


def _padded(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def _prepare_seq2seq(dataset: DatasetRef, table: Table, model, PreparedData):
    source_column, sources = _texts(table, dataset.text_column, "source", "text")
    target_column, targets = _texts(table, dataset.target, "target", "target")
    if source_column == target_column:
        raise UserError(f"column {source_column!r} cannot be both the source and the target")
    parts = _parts(len(sources), dataset)
    codec_type = WordCodec if model.tokenizer == "word" else CharCodec
    codec = codec_type.train([sources[i] for i in parts["train"]] + [targets[i] for i in parts["train"]], _SPECIALS)
    s_len, t_len = model.max_source_tokens, model.max_target_tokens
    source_ids = _padded([encode_source(codec, s, s_len) for s in sources], s_len)
    full = [codec.encode(t)[:t_len - 1] + [EOS_ID] for t in targets]
    decoder_in = _padded([[BOS_ID] + row[:-1] for row in full], t_len)
    decoder_out = _padded(full, t_len)
    x = np.concatenate([source_ids, decoder_in], axis=1)
    splits = {name: (x[idx], decoder_out[idx]) for name, idx in parts.items()}
    document = codec.to_json()
    signature = {
        "input_kind": "tokens", "input_shape": [s_len + t_len], "sequence_shape": [s_len + t_len, 1],
        "num_outputs": codec.vocab_size, "vocab_size": codec.vocab_size, "classes": None, "target": target_column,
        "feature_names": [source_column], "text_column": source_column, "max_source_tokens": s_len,
        "max_target_tokens": t_len, "tokenizer": codec.kind, "tokenizer_sha256": sha256_of(document),
    }
    return PreparedData(SEQUENCE_TO_SEQUENCE, splits, signature, codec=codec)
