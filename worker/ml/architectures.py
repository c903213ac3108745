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


class WideNgrams(nn.Module):
    """The wide path of a text classifier before :class:`WideTerms`: a linear model over a text's bag of token n-grams.

    Kept so that checkpoints saved with it resume and predict as they were trained.

    A single token is its own id; a run of 2 to ``ngram_max`` real tokens is hashed into one of
    ``buckets`` ids after the vocabulary. Each n-gram of a text weighs its inverse document
    frequency in the training split (``idf``, a saved buffer that :meth:`fit_idf` sets; smoothed as
    scikit-learn's), divided by the length of the text's vector of those weights, so a text's bag
    is a TF-IDF row as the linear baseline reads it. Training fits the n-gram weights first, to
    convergence, as the TF-IDF + logistic-regression baseline (:meth:`fit`), then freezes them and
    trains the deep body and head, the head starting at zero, on top: the wide & deep recipe, where
    the deep part adds what word order and embeddings tell to a fully fitted linear model.
    """

    HASH_PRIME, HASH_MODULUS = 1_000_003, 2_147_483_647

    def __init__(self, vocab_size: int, buckets: int, ngram_max: int, num_outputs: int):
        super().__init__()
        self.vocab_size, self.buckets, self.ngram_max = vocab_size, buckets, ngram_max
        size = vocab_size + (buckets if ngram_max > 1 else 0)
        self.weight = nn.Embedding(size, num_outputs)
        nn.init.zeros_(self.weight.weight)
        self.register_buffer("idf", torch.ones(size))

    @torch.no_grad()
    def fit_idf(self, ids: torch.Tensor) -> None:
        """Set ``idf`` from the token ids of the training texts: ln((1 + texts) / (1 + texts with the n-gram)) + 1."""
        grams, weights, _ = self.grams(ids.to(self.idf.device))
        rows = torch.arange(len(grams), device=grams.device).unsqueeze(1).expand_as(grams)
        real = weights > 0
        # Each (text, n-gram) pair once: a text counts once however often it repeats an n-gram.
        pairs = torch.unique(rows[real] * len(self.idf) + grams[real])
        df = torch.bincount(pairs % len(self.idf), minlength=len(self.idf))
        self.idf.copy_(torch.log((1.0 + len(grams)) / (1.0 + df.to(self.idf.dtype))) + 1.0)

    def fit(self, ids: torch.Tensor, targets: torch.Tensor, *, c: float = 10.0, max_iter: int = 100) -> torch.Tensor:
        """Fit the n-gram weights as the TF-IDF + logistic-regression baseline (:func:`fit_logistic`); its bias.

        ``c`` = 10 was measured on the fortunes corpus (split seeds 0-4, against TF-IDF + LR): C=1
        trails the baseline by 0.04 on average, C=10 by 0.01 (C=30 no better).
        """
        grams, weights, _ = self.grams(ids.to(self.idf.device))
        return fit_logistic(self.weight.weight,
                            lambda w: nn.functional.embedding_bag(grams, w, per_sample_weights=weights, mode="sum"),
                            targets, outputs=self.weight.weight.shape[1], c=c, max_iter=max_iter)

    def grams(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Ids (batch, grams) of every n-gram, their weights, and how many n-grams of each length."""
        mask = ids != PAD_ID
        grams, masks, lengths = [ids], [mask], [ids.shape[1]]
        hashed, real = ids, mask
        for n in range(2, self.ngram_max + 1):
            hashed = (hashed[:, :-1] * self.HASH_PRIME + ids[:, n - 1:]) % self.HASH_MODULUS
            real = real[:, :-1] & mask[:, n - 1:]
            grams.append(self.vocab_size + hashed % self.buckets)
            masks.append(real)
            lengths.append(hashed.shape[1])
        grams = torch.cat(grams, dim=1)
        weights = torch.cat(masks, dim=1).to(torch.float32) * self.idf[grams]
        weights = weights / weights.square().sum(dim=1, keepdim=True).sqrt().clamp(min=1e-12)
        return grams, weights, lengths

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, outputs)."""
        grams, weights, _ = self.grams(ids)
        return (self.weight(grams) * weights.unsqueeze(-1)).sum(dim=1)

    def per_token(self, ids: torch.Tensor) -> torch.Tensor:
        """The logits split over the tokens (batch, tokens, outputs): each n-gram's share goes in
        equal parts to its tokens, so a text's shares sum to :meth:`forward`."""
        grams, weights, lengths = self.grams(ids)
        parts = (self.weight(grams) * weights.unsqueeze(-1)).split(lengths, dim=1)
        shares = torch.zeros(*ids.shape, parts[0].shape[-1], dtype=parts[0].dtype, device=ids.device)
        for n, part in enumerate(parts, start=1):
            for offset in range(n):
                shares[:, offset:offset + part.shape[1]] += part / n
        return shares


class WideTerms(nn.Module):
    """The wide path of a token-reading classifier: a linear model over the text's word n-grams.

    It reads what :class:`worker.ml.text.WordNgrams` appends to the token ids: the ids of a text's
    distinct n-grams (0 pads) and their counts. Each weighs (1 + ln count) x its idf in the
    training split (``idf``, a saved buffer set from the fit), divided by the length of the
    text's vector of those weights: the TF-IDF row of the baseline, over the whole text. Training
    fits the weights first, to convergence, as the TF-IDF + logistic-regression baseline
    (:meth:`fit`), then freezes them and trains the deep body and head, the head starting at
    zero, on top: the wide & deep recipe, where the deep part adds what word order and embeddings
    tell to a fully fitted linear model.
    """

    def __init__(self, terms: int, num_outputs: int):
        super().__init__()
        self.terms = nn.Embedding(terms + 1, num_outputs, padding_idx=0)
        nn.init.zeros_(self.terms.weight)
        self.register_buffer("idf", torch.ones(terms + 1))

    def fit(self, columns: torch.Tensor, targets: torch.Tensor, *, c: float = 10.0, max_iter: int = 100) -> torch.Tensor:
        """Fit the n-gram weights as the TF-IDF + logistic-regression baseline (:func:`fit_logistic`); its bias."""
        ids, weights = self.weighted(columns.to(self.idf.device))
        return fit_logistic(self.terms.weight,
                            lambda w: nn.functional.embedding_bag(ids, w, per_sample_weights=weights, mode="sum"),
                            targets, outputs=self.terms.weight.shape[1], c=c, max_iter=max_iter)

    def weighted(self, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The n-gram ids (batch, width) and their TF-IDF weights, each row of unit length."""
        ids, counts = columns.chunk(2, dim=1)
        tf = torch.where(counts > 0, 1.0 + torch.log(counts.clamp(min=1).to(torch.float32)), 0.0)
        weights = tf * self.idf[ids]
        return ids, weights / weights.square().sum(dim=1, keepdim=True).sqrt().clamp(min=1e-12)

    def per_term(self, columns: torch.Tensor) -> torch.Tensor:
        """Each n-gram's share of the logits (batch, width, outputs); a text's shares sum to :meth:`forward`."""
        ids, weights = self.weighted(columns)
        return self.terms(ids) * weights.unsqueeze(-1)

    def forward(self, columns: torch.Tensor) -> torch.Tensor:
        """Logits (batch, outputs)."""
        return self.per_term(columns).sum(dim=1)


class WideTfidf(nn.Module):
    """The wide path of ``mlp`` + ``tfidf``: a linear model over the TF-IDF features the MLP reads.

    Fitted first as the TF-IDF + logistic-regression baseline (:func:`fit_logistic`), then frozen,
    as :class:`WideTerms` is for the token-reading classifiers.
    """

    def __init__(self, features: int, num_outputs: int):
        super().__init__()
        self.weight = nn.Linear(features, num_outputs, bias=False)
        nn.init.zeros_(self.weight.weight)

    def fit(self, features: torch.Tensor, targets: torch.Tensor, *, c: float = 10.0,
            max_iter: int = 100) -> torch.Tensor:
        """Fit the weights as a logistic regression over ``features`` (rows, features); its bias."""
        return fit_logistic(self.weight.weight, lambda w: features @ w.T, targets,
                            outputs=self.weight.weight.shape[0], c=c, max_iter=max_iter)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (batch, outputs)."""
        return self.weight(features)


def fit_logistic(weight: torch.Tensor, logits_of: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor, *,
                 outputs: int, c: float, max_iter: int) -> torch.Tensor:
    """Fit ``weight`` as an L2 multinomial logistic regression over ``outputs`` classes; its bias.

    ``logits_of(w)`` is every training row's logits under weights ``w`` (bias left out). The
    objective is scikit-learn's ``LogisticRegression(C=c)`` divided by the number of rows: mean
    cross-entropy + ||W||^2 / (2 c n), the bias unregularised, minimised full-batch by L-BFGS with
    a strong-Wolfe line search for at most ``max_iter`` iterations; so it reaches the baseline's
    solution over the same features. It draws no random numbers. The caller puts the bias in the
    network's head.
    """
    w = torch.zeros_like(weight, requires_grad=True)
    targets, n = targets.to(w.device), len(targets)
    b = torch.zeros(outputs, dtype=w.dtype, device=w.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=10,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits_of(w) + b, targets) + w.square().sum() / (2.0 * c * n)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        weight.copy_(w)
    return b.detach()


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
