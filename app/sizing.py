"""Sizing a training job before it is queued: its parameter count and a device-memory estimate.

Torch-free, from the spec alone (and the dataset facts the web already has). Counts for Kiln's
own architectures follow their layers in ``worker.ml.architectures`` (an upper bound for text,
whose vocabulary is at most ``dataset.vocab_size``); a pretrained model's count is its catalog
entry's. The estimate is deliberately simple and says what it assumes:
parameters x 16 bytes (fp32 weights, gradients and AdamW's two moments) plus activations of
one batch (batch x steps x width x layers x 4 bytes x ``ACTIVATION_FACTOR``).
"""

from __future__ import annotations

from dataclasses import dataclass

from app import pretrained
from app.jobs.schemas import TrainSpec

BYTES_PER_PARAMETER = 16
# Tensors kept per layer for the backward pass, in units of (batch x steps x width) floats.
ACTIVATION_FACTOR = 12


@dataclass(frozen=True)
class SizeEstimate:
    """What a job's model needs: parameters and bytes of device memory."""

    parameters: int
    parameter_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        """Parameters, gradients, optimizer state and activations together."""
        return self.parameter_bytes + self.activation_bytes

    def as_dict(self) -> dict:
        """The estimate as the API reports it."""
        return {"parameters": self.parameters, "parameter_bytes": self.parameter_bytes,
                "activation_bytes": self.activation_bytes, "total_bytes": self.total_bytes}


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _own_model(model, *, steps: int, per_step: int, outputs: int, vocab: int) -> tuple[int, int, int]:
    """(parameters, width, layers) of a Kiln architecture reading steps x per_step values."""
    embedding = 0
    if vocab:
        per_step = model.hidden_sizes[0] if model.arch == "mlp" and model.hidden_sizes else (
            64 if model.arch == "mlp" else model.hidden_size if model.arch in ("rnn", "lstm", "gru")
            else model.d_model if model.arch == "transformer" else model.channels[0])
        embedding = vocab * per_step
        steps = 1 if model.arch == "mlp" else steps
    if model.arch == "mlp":
        count, width = 0, per_step * steps
        for size in model.hidden_sizes:
            count, width = count + _linear(width, size), size
        return embedding + count + _linear(width, outputs), width, max(len(model.hidden_sizes), 1)
    if model.arch in ("rnn", "lstm", "gru"):
        gates = {"rnn": 1, "lstm": 4, "gru": 3}[model.arch]
        directions = 2 if model.bidirectional else 1
        count, width, hidden = 0, per_step, model.hidden_size
        for _ in range(model.num_layers):
            count += directions * gates * (width * hidden + hidden * hidden + 2 * hidden)
            width = hidden * directions
        return embedding + count + _linear(width, outputs), width * gates, model.num_layers
    if model.arch == "transformer":
        d, ff = model.d_model, model.dim_feedforward
        count = 0 if per_step == d else _linear(per_step, d)
        count += d if model.pooling == "cls" else 0
        count += (steps + 1) * d if model.positional == "learned" else 0
        count += model.num_layers * (4 * d * d + 4 * d + _linear(d, ff) + _linear(ff, d) + 4 * d) + 2 * d
        return embedding + count + _linear(d, outputs), max(d, ff), model.num_layers
    count, width = 0, per_step
    for channels in model.channels:
        count, width = count + width * channels * model.kernel_size + channels, channels
    return embedding + count + _linear(width, outputs), max(model.channels), len(model.channels)


def estimate(spec: TrainSpec, *, num_features: int, num_outputs: int, sequence_shape: tuple[int, int] | None = None
             ) -> SizeEstimate:
    """The size of ``spec``'s model for data of ``num_features`` inputs and ``num_outputs`` outputs."""
    model, ds, batch = spec.model, spec.dataset, spec.hyperparameters.batch_size
    if model.arch in ("causal_lm", "seq2seq"):
        return _generator(model, batch)
    if model.arch == "pretrained":
        entry = pretrained.get(model.base)
        parameters = entry.parameters + _linear(entry.hidden_size, num_outputs)
        if model.lora is not None:
            # Two r-wide matrices per adapted layer; only they (and the head) carry optimizer state.
            adapters = len(model.lora.target_modules) * entry.num_layers * 2 * model.lora.r * entry.hidden_size
            trained = adapters + _linear(entry.hidden_size, num_outputs)
            parameter_bytes = 4 * parameters + (BYTES_PER_PARAMETER - 4) * trained
            parameters += adapters
        else:
            parameter_bytes = BYTES_PER_PARAMETER * parameters
        activations = batch * model.max_length * entry.hidden_size * entry.num_layers * 4 * ACTIVATION_FACTOR
        return SizeEstimate(parameters, parameter_bytes, activations)
    text = ds.text_column is not None
    steps, per_step = (ds.max_tokens, 1) if text else (sequence_shape or (num_features, 1))
    vocab = ds.token_vocab_size if text else 0
    if text and getattr(model, "tfidf", None) is not None:  # one n-gram-wide vector, no embedding
        steps, per_step, vocab = 1, model.tfidf.max_features, 0
    parameters, width, layers = _own_model(model, steps=steps, per_step=per_step, outputs=num_outputs, vocab=vocab)
    if text and vocab and getattr(model, "wide", False):  # the wide path: a weight per n-gram id and class, and its idf
        parameters += (vocab + (model.wide_buckets if model.wide_ngram_max > 1 else 0)) * (num_outputs + 1)
    elif text and getattr(model, "wide", False):  # mlp + tfidf's wide path: a weight per feature and class
        parameters += per_step * num_outputs
    activations = batch * steps * width * layers * 4 * ACTIVATION_FACTOR
    return SizeEstimate(parameters, BYTES_PER_PARAMETER * parameters, activations)


def _generator(model, batch: int) -> SizeEstimate:
    """A text generator's size: embedding, transformer blocks, vocabulary head and per-token logits."""
    d, ff = model.d_model, model.dim_feedforward
    # Character and word vocabularies are known only once the text is read; 256 and 4096 bound the usual ones.
    vocab = (model.vocab_size if model.tokenizer == "bpe" else 256) if model.arch == "causal_lm" else 4096
    block = 4 * d * d + 4 * d + _linear(d, ff) + _linear(ff, d) + 4 * d
    if model.arch == "causal_lm":
        layers, tokens = model.num_layers, model.block_size
        parameters = vocab * d + model.block_size * d + layers * block + 2 * d
        parameters += 0 if model.tie_weights else vocab * d
    else:
        layers, tokens = model.num_encoder_layers + model.num_decoder_layers, model.max_source_tokens + model.max_target_tokens
        # A decoder layer adds cross-attention (one more attention block's worth).
        parameters = vocab * d + tokens * d + layers * block + model.num_decoder_layers * (4 * d * d + 6 * d)
        parameters += _linear(d, vocab) + 4 * d
    activations = batch * tokens * (max(d, ff) * layers * ACTIVATION_FACTOR + vocab) * 4
    return SizeEstimate(parameters, BYTES_PER_PARAMETER * parameters, activations)
