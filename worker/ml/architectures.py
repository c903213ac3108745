"""The architecture registry: an encoder body per ``arch`` between a shared input front and a head.

Every architecture serves every task through the same three inputs:
- ``vector``: a tabular row; the MLP reads it flat, sequence models as ``sequence_shape``
  (digits: 8 steps of 8 pixels; other tables: one feature per step);
- ``sequence``: a forecasting window (steps, 1); the MLP flattens it;
- ``tokens``: token ids, embedded; the MLP averages the embeddings of the real tokens; in training,
  ``embedding_dropout`` drops whole token embeddings (and scales up the rest);
  with ``model.wide`` (the default), a linear path over the text's word n-grams (read from the
  whole text, after the token ids) adds its logits to the head's (wide & deep, :class:`WideTerms`;
  checkpoints from before it read the token n-grams, :class:`WideNgrams`);
- ``tfidf``: a text's TF-IDF n-gram features (``mlp`` only), read as a flat vector; with ``model.wide``
  a linear model over the same features adds its logits to the head's (:class:`WideTfidf`);
- ``image``: pixels (channels, height, width); the 2-D CNN reads them as they are, the MLP flat.
The text generators (``causal_lm``, ``seq2seq``) are whole networks of their own modules, registered
with ``build_network``. Which architecture serves which task is ``app.task_rules.ARCHITECTURE_TASKS``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from app.jobs.schemas import (
    CausalLMConfig, CNN1DConfig, CNN2DConfig, MLPConfig, RecurrentConfig, Seq2SeqConfig, TransformerConfig,
)
from app.task_rules import ARCHITECTURE_TASKS
from worker.ml.causal_lm import CausalLM
from worker.ml.seq2seq import Seq2Seq
from worker.ml.text import PAD_ID
from worker.ml.wide import WideNgrams, WideTerms, WideTfidf

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class ModelShape:
    """What a network reads and what it must produce."""

    input_kind: str  # "vector" | "sequence" | "tokens" | "image"
    sequence_shape: tuple[int, int]  # (steps, features per step) for sequence models
    num_outputs: int
    vocab_size: int = 0
    image_shape: tuple[int, int, int] | None = None  # (channels, height, width) of images
    wide_terms: int = 0  # text: word n-grams of the wide path (WideTerms), read after the token ids

    @classmethod
    def from_signature(cls, signature: dict) -> "ModelShape":
        """The shape recorded in a model signature."""
        steps, channels = signature["sequence_shape"]
        image = signature.get("image_shape")
        return cls(signature["input_kind"], (int(steps), int(channels)), int(signature["num_outputs"]),
                   int(signature.get("vocab_size") or 0), tuple(int(n) for n in image) if image else None,
                   int(signature.get("wide_terms") or 0))


def masked_mean(seq: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over steps of (batch, steps, width), counting only steps where ``mask`` is true."""
    if mask is None:
        return seq.mean(dim=1)
    weights = mask.unsqueeze(-1).to(seq.dtype)
    return (seq * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class MLPBody(nn.Module):
    """Fully connected layers over the flattened input (or the mean token embedding)."""

    def __init__(self, config: MLPConfig, in_features: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in config.hidden_sizes:
            layers += [nn.Linear(width, size), _ACTIVATIONS[config.activation]()]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width = size
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, seq: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Features (batch, out_features)."""
        flat = masked_mean(seq, mask) if mask is not None else seq.flatten(1)
        return self.layers(flat)


class RecurrentBody(nn.Module):
    """RNN, LSTM or GRU; the final hidden state of the top layer (both directions) is the output."""

    def __init__(self, config: RecurrentConfig, in_features: int):
        super().__init__()
        cell = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[config.arch]
        self.rnn = cell(in_features, config.hidden_size, num_layers=config.num_layers, batch_first=True,
                        bidirectional=config.bidirectional,
                        dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.directions = 2 if config.bidirectional else 1
        self.out_features = config.hidden_size * self.directions

    def forward(self, seq: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Features (batch, hidden * directions)."""
        # cuDNN RNNs accept bf16 only from cuDNN 9.13 on, so under autocast they run in fp32.
        autocast = torch.is_autocast_enabled(seq.device.type)
        if autocast:
            seq = seq.float()
        if mask is not None:
            # Packing makes "last step" mean the last real token, not the padding after it.
            lengths = mask.sum(dim=1).clamp(min=1).cpu()
            seq = nn.utils.rnn.pack_padded_sequence(seq, lengths, batch_first=True, enforce_sorted=False)
        with torch.autocast(device_type=seq.data.device.type, enabled=False) if autocast else contextlib.nullcontext():
            _, hidden = self.rnn(seq)
        if isinstance(hidden, tuple):  # LSTM returns (h, c)
            hidden = hidden[0]
        return torch.cat(list(hidden[-self.directions:]), dim=1)


class SinusoidalPositions(nn.Module):
    """Fixed sine/cosine position codes (Vaswani et al.), added to the input."""

    def __init__(self, max_len: int, width: int):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        scale = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
        table = torch.zeros(max_len, width)
        table[:, 0::2] = torch.sin(position * scale)
        table[:, 1::2] = torch.cos(position * scale)[:, : width // 2]
        # Not saved: it is a pure function of the shape, so checkpoints stay small.
        self.register_buffer("table", table, persistent=False)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq`` plus the codes of its positions."""
        return seq + self.table[: seq.shape[1]].to(seq.dtype)


class LearnedPositions(nn.Module):
    """A trained embedding per position."""

    def __init__(self, max_len: int, width: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(max_len, width) * 0.02)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq`` plus the embeddings of its positions."""
        return seq + self.table[: seq.shape[1]].to(seq.dtype)


class TransformerBody(nn.Module):
    """A pre-norm transformer encoder, pooled by mean, a [CLS] token or the last real step."""

    def __init__(self, config: TransformerConfig, in_features: int, steps: int):
        super().__init__()
        width = config.d_model
        self.project = nn.Identity() if in_features == width else nn.Linear(in_features, width)
        self.pooling = config.pooling
        self.cls = nn.Parameter(torch.zeros(1, 1, width)) if config.pooling == "cls" else None
        max_len = steps + (1 if self.cls is not None else 0)
        self.positions = {"sinusoidal": SinusoidalPositions, "learned": LearnedPositions}.get(config.positional)
        self.positions = self.positions(max_len, width) if self.positions else nn.Identity()
        layer = nn.TransformerEncoderLayer(width, config.nhead, config.dim_feedforward, config.dropout,
                                           batch_first=True, norm_first=True)
        # Nested tensors are a padding fast path that gives no benefit at these sizes; off for
        # identical numerics in training and evaluation.
        self.encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out_features = width

    def forward(self, seq: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Features (batch, d_model)."""
        seq = self.project(seq)
        if mask is None:
            mask = torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device)
        if self.cls is not None:
            seq = torch.cat([self.cls.expand(seq.shape[0], -1, -1).to(seq.dtype), seq], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        encoded = self.norm(self.encoder(self.positions(seq), src_key_padding_mask=~mask))
        if self.pooling == "cls":
            return encoded[:, 0]
        if self.pooling == "last":
            last = mask.long().sum(dim=1).clamp(min=1) - 1
            return encoded[torch.arange(encoded.shape[0], device=encoded.device), last]
        return masked_mean(encoded, mask)


class CNN1DBody(nn.Module):
    """Same-padded 1-D convolutions over steps, then a global average over (real) steps."""

    def __init__(self, config: CNN1DConfig, in_features: int):
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_features
        for channels in config.channels:
            block = [nn.Conv1d(width, channels, config.kernel_size, padding="same"), nn.ReLU()]
            if config.dropout:
                block.append(nn.Dropout(config.dropout))
            blocks.append(nn.Sequential(*block))
            width = channels
        self.blocks = nn.ModuleList(blocks)
        self.out_features = width

    def forward(self, seq: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Features (batch, last channels)."""
        keep = mask.unsqueeze(1).to(seq.dtype) if mask is not None else None
        hidden = seq.transpose(1, 2)
        for block in self.blocks:
            # Zeroing padded steps before every layer makes padding look like the conv's own
            # zero padding, so how much padding follows a text cannot change the result.
            hidden = block(hidden * keep if keep is not None else hidden)
        return masked_mean(hidden.transpose(1, 2), mask)


class CNN2DBody(nn.Module):
    """Blocks of same-padded conv, batch norm, ReLU, 2x2 max pool (while the image is at least
    2 pixels high and wide) and dropout, then a global average over the remaining pixels."""

    def __init__(self, config: CNN2DConfig, image_shape: tuple[int, int, int]):
        super().__init__()
        width, side = image_shape[0], min(image_shape[1:])
        blocks: list[nn.Module] = []
        for channels in config.channels:
            # No bias: the batch norm right after adds its own shift.
            block = [nn.Conv2d(width, channels, config.kernel_size, padding="same", bias=False),
                     nn.BatchNorm2d(channels), nn.ReLU()]
            if side >= 2:
                block.append(nn.MaxPool2d(2))
                side //= 2
            if config.dropout:
                block.append(nn.Dropout(config.dropout))
            blocks.append(nn.Sequential(*block))
            width = channels
        self.blocks = nn.Sequential(*blocks)
        self.out_features = width

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Features (batch, last channels)."""
        return self.blocks(images).mean(dim=(2, 3))


class Network(nn.Module):
    """Input front (reshape or token embedding), an architecture's body, and a linear head."""

    def __init__(self, body: nn.Module, shape: ModelShape, embedding_dim: int, embedding_dropout: float = 0.0,
                 wide: WideNgrams | WideTerms | WideTfidf | None = None):
        super().__init__()
        self.embedding_dropout = embedding_dropout
        self.input_kind = shape.input_kind
        self.sequence_shape = shape.image_shape if shape.input_kind == "image" else shape.sequence_shape
        self.embedding = None
        if shape.input_kind == "tokens":
            self.embedding = nn.Embedding(shape.vocab_size, embedding_dim, padding_idx=PAD_ID)
        self.body = body
        self.head = nn.Linear(body.out_features, shape.num_outputs)
        self.wide = wide
        # Token ids come first in a row; the word n-grams of a WideTerms path after them.
        self.steps = shape.sequence_shape[0] if isinstance(wide, WideTerms) else None

    def split(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the deep part reads and what the wide path reads, of a row of inputs."""
        if self.steps is None:
            return inputs, inputs
        return inputs[:, :self.steps], inputs[:, self.steps:]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits (classification) or standardised values (regression, forecasting)."""
        mask = None
        inputs, wide_inputs = self.split(inputs)
        if self.embedding is not None:
            mask = inputs != PAD_ID
            seq = self.embedding(inputs)
            if self.training and self.embedding_dropout > 0:
                seq = drop_tokens(seq, self.embedding_dropout)
        else:
            seq = inputs.reshape(inputs.shape[0], *self.sequence_shape)
        logits = self.head(self.body(seq, mask))
        if self.wide is not None:
            logits = logits + self.wide(wide_inputs).to(logits.dtype)
        return logits


def drop_tokens(seq: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each token's whole embedding with probability ``p`` and scale the kept ones by 1 / (1 - p)."""
    keep = torch.empty(seq.shape[:2], device=seq.device, dtype=seq.dtype).bernoulli_(1.0 - p)
    return seq * (keep / (1.0 - p)).unsqueeze(-1)


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: its config type, its body, and the tasks it serves."""

    name: str
    config_type: type
    build_body: Callable[[object, int, int], nn.Module]  # (config, features per step, steps)
    embedding_dim: Callable[[object], int]
    # (config, (channels, height, width)): the body over images, for architectures that read them.
    build_image_body: Callable[[object, tuple[int, int, int]], nn.Module] | None = None
    # (config, shape): a whole network with its own input and output (the text generators).
    build_network: Callable[[object, "ModelShape"], nn.Module] | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this architecture serves (the rule lives in ``app.task_rules``)."""
        return ARCHITECTURE_TASKS[self.name]


def _recurrent(name: str) -> Architecture:
    return Architecture(name, RecurrentConfig, lambda c, f, s: RecurrentBody(c, f), lambda c: c.hidden_size)


def _no_sequence_body(config, per_step: int, steps: int) -> nn.Module:
    raise ValueError(f"{config.arch} reads images only")


def _generator(name: str, config_type: type, network: Callable[[object, int], nn.Module]) -> Architecture:
    # A text generator has no body-and-head split: it reads tokens and writes logits per token.
    return Architecture(name, config_type, _no_sequence_body, lambda c: c.d_model,
                        build_network=lambda c, shape: network(c, shape.vocab_size))


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("mlp", MLPConfig, lambda c, f, s: MLPBody(c, f * s),
                     lambda c: c.hidden_sizes[0] if c.hidden_sizes else 64,
                     lambda c, shape: MLPBody(c, shape[0] * shape[1] * shape[2])),
        _recurrent("rnn"),
        _recurrent("lstm"),
        _recurrent("gru"),
        Architecture("transformer", TransformerConfig, lambda c, f, s: TransformerBody(c, f, s), lambda c: c.d_model),
        Architecture("cnn1d", CNN1DConfig, lambda c, f, s: CNN1DBody(c, f), lambda c: c.channels[0]),
        Architecture("cnn2d", CNN2DConfig, _no_sequence_body, lambda c: c.channels[0],
                     lambda c, shape: CNN2DBody(c, shape)),
        _generator("causal_lm", CausalLMConfig, CausalLM),
        _generator("seq2seq", Seq2SeqConfig, Seq2Seq),
    )
}


def build_model(config, shape: ModelShape) -> nn.Module:
    """A fresh network for ``config`` (a schemas model config) reading and producing ``shape``."""
    if config.arch == "pretrained":
        # Imported here: transformers loads only for jobs that use a pretrained encoder.
        from worker.ml.pretrained import build_network

        return build_network(config, shape.num_outputs)
    architecture = ARCHITECTURES[config.arch]
    if architecture.build_network is not None:
        return architecture.build_network(config, shape)
    if shape.input_kind == "image":
        if architecture.build_image_body is None or shape.image_shape is None:
            raise ValueError(f"{config.arch} does not read images")
        return Network(architecture.build_image_body(config, shape.image_shape), shape, 0)
    steps, per_step = shape.sequence_shape
    if shape.input_kind == "tokens":
        per_step = architecture.embedding_dim(config)
        # The MLP averages embeddings, so it sees one embedding-wide vector, not steps of them.
        steps = 1 if config.arch == "mlp" else steps
    body = architecture.build_body(config, per_step, steps)
    wide = None
    if shape.input_kind == "tokens" and shape.wide_terms:
        wide = WideTerms(shape.wide_terms, shape.num_outputs)
    elif shape.input_kind == "tokens" and getattr(config, "wide", False):  # checkpoints from before WideTerms
        wide = WideNgrams(shape.vocab_size, config.wide_buckets, config.wide_ngram_max, shape.num_outputs)
    elif shape.input_kind == "tfidf" and getattr(config, "wide", False):
        wide = WideTfidf(shape.sequence_shape[0], shape.num_outputs)
    return Network(body, shape, architecture.embedding_dim(config), getattr(config, "embedding_dropout", 0.0), wide)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts of a network."""
    parameters = list(model.parameters())
    return {"parameters": sum(p.numel() for p in parameters),
            "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad)}
