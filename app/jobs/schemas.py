"""Pydantic job specs: everything a job may ask for, validated before anything is stored.

Unknown keys are errors (a typo must not be ignored silently). Architectures, datasets and
hyperparameters are chosen from registered options; no spec can carry code.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from app.jobs.errors import SpecError
from app.models.base import MAX_ID

Name = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]


class Strict(BaseModel):
    """Base for spec parts: unknown fields are refused."""

    # NaN and infinity are refused everywhere: they would poison training and are not valid JSON.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- architectures --------------------------------------------------------------------------


class _ReadsTokens(Strict):
    """A setting of every architecture that reads text through a token embedding."""

    embedding_dropout: float = Field(
        default=0.1, ge=0.0, lt=1.0,
        description="text: share of tokens whose whole embedding is dropped in training (the rest are scaled up)")
    embedding_init: Literal["random", "lsa"] = Field(
        default="lsa",
        description="text: token embeddings start random, or from latent semantic analysis of the training split")
    wide: bool = Field(
        default=True,
        description="text: a linear TF-IDF path over the whole text's word n-grams (mlp + tfidf: over its TF-IDF "
                    "features), fitted first as a logistic regression; the network trains on top of it")
    wide_ngram_max: int = Field(default=2, ge=1, le=3, description="text, wide path: longest word n-gram counted")
    wide_buckets: int = Field(default=65536, ge=1, le=4_194_304,
                              description="text, wide path: word n-grams kept beyond the vocabulary size (the most "
                                          "frequent); in checkpoints of the token n-gram path, its hashed ids")
    wide_min_gain: float = Field(
        default=0.02, ge=0.0, le=1.0,
        description="text, wide path: the deep part replaces the fitted linear model as the best weights only when "
                    "it beats the linear model's monitored validation metric by more than this")


class TfidfFeatures(Strict):
    """Bag-of-n-grams features of a text, weighted by TF-IDF, fitted on the training split only."""

    ngram_max: int = Field(default=2, ge=1, le=3, description="longest word n-gram counted (1: single words)")
    max_features: int = Field(default=20000, ge=16, le=200_000, description="most frequent n-grams kept")
    min_df: int = Field(default=1, ge=1, le=1000, description="n-grams in fewer training texts are dropped")
    sublinear_tf: bool = Field(default=True, description="count c weighs 1 + log(c)")


class MLPConfig(_ReadsTokens):
    """A multilayer perceptron over flat features (text: the mean token embedding, or TF-IDF features)."""

    arch: Literal["mlp"]
    hidden_sizes: list[Annotated[int, Field(ge=1, le=8192)]] = Field(default=[128, 64], max_length=8)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    tfidf: TfidfFeatures | None = Field(
        default=None, description="text only: read TF-IDF n-gram features instead of token embeddings")


class RecurrentConfig(_ReadsTokens):
    """An RNN, LSTM or GRU over a sequence; the last step (both directions) feeds the head."""

    arch: Literal["rnn", "lstm", "gru"]
    hidden_size: int = Field(default=64, ge=1, le=4096)
    num_layers: int = Field(default=1, ge=1, le=8)
    bidirectional: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class TransformerConfig(_ReadsTokens):
    """A transformer encoder over a sequence, pooled into the head."""

    arch: Literal["transformer"]
    d_model: int = Field(default=64, ge=4, le=2048)
    nhead: int = Field(default=4, ge=1, le=64)
    num_layers: int = Field(default=2, ge=1, le=24)
    dim_feedforward: int = Field(default=128, ge=4, le=16384)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    positional: Literal["sinusoidal", "learned", "none"] = "sinusoidal"
    pooling: Literal["mean", "cls", "last"] = "mean"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "TransformerConfig":
        if self.d_model % self.nhead:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by nhead ({self.nhead})")
        return self


class CNN1DConfig(_ReadsTokens):
    """A 1-D convolutional network over a sequence, global-average pooled."""

    arch: Literal["cnn1d"]
    channels: list[Annotated[int, Field(ge=1, le=2048)]] = Field(default=[32, 64], min_length=1, max_length=8)
    kernel_size: int = Field(default=3, ge=1, le=31)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class CNN2DConfig(Strict):
    """A 2-D convolutional network over images: conv, batch norm, ReLU, max pool (and dropout) per
    block, then a global average pool into the head."""

    arch: Literal["cnn2d"]
    channels: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default=[32, 64], min_length=1, max_length=8, description="output channels of each conv block"
    )
    kernel_size: int = Field(default=3, ge=1, le=15)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class LoraConfig(Strict):
    """Low-rank adapters (peft's LoRA) on the named linear layers; only they and the head train."""

    r: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=16.0, gt=0.0, le=4096.0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.]+$")]] = Field(
        default=["query", "value"], min_length=1, max_length=32)


class PretrainedConfig(Strict):
    """A catalog model (``app/pretrained.toml``) with a new head, fine-tuned on a text column."""

    arch: Literal["pretrained"]
    base: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    head: Literal["classification", "regression"] = "classification"
    freeze: Literal["none", "embeddings", "all_but_head"] = "none"
    lora: LoraConfig | None = None
    max_length: int = Field(default=128, ge=2, le=8192, description="tokens per text (truncated; padded per batch)")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="dropout before the head")


class _TextTransformer(Strict):
    """Widths shared by the text generators (pre-norm transformer blocks)."""

    d_model: int = Field(default=128, ge=8, le=4096)
    nhead: int = Field(default=4, ge=1, le=64)
    dim_feedforward: int = Field(default=512, ge=8, le=16384)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.nhead:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by nhead ({self.nhead})")
        return self


class CausalLMConfig(_TextTransformer):
    """A decoder-only transformer language model over a text column (task language_modeling)."""

    arch: Literal["causal_lm"]
    num_layers: int = Field(default=4, ge=1, le=48)
    block_size: int = Field(default=128, ge=4, le=4096, description="context length in tokens; training windows are this long")
    positional: Literal["learned", "rotary"] = Field(default="learned", description="learned position table, or rotary (RoPE)")
    tokenizer: Literal["char", "bpe"] = Field(default="char", description="characters, or byte-level BPE trained on the training split")
    vocab_size: int = Field(default=1024, ge=64, le=65536, description="BPE vocabulary size (bpe only)")
    tie_weights: bool = Field(default=True, description="the output layer shares the token embedding")


class Seq2SeqConfig(_TextTransformer):
    """An encoder-decoder transformer that writes dataset.target's text for dataset.text_column's text."""

    arch: Literal["seq2seq"]
    num_encoder_layers: int = Field(default=2, ge=1, le=24)
    num_decoder_layers: int = Field(default=2, ge=1, le=24)
    tokenizer: Literal["word", "char"] = Field(default="word", description="whitespace-separated words, or characters")
    max_source_tokens: int = Field(default=64, ge=1, le=2048)
    max_target_tokens: int = Field(default=64, ge=1, le=2048)


ModelConfig = Annotated[
    Union[MLPConfig, RecurrentConfig, TransformerConfig, CNN1DConfig, CNN2DConfig, PretrainedConfig,
          CausalLMConfig, Seq2SeqConfig],
    Field(discriminator="arch"),
]
ARCHITECTURES = ("mlp", "rnn", "lstm", "gru", "transformer", "cnn1d", "cnn2d", "causal_lm", "seq2seq", "pretrained")
GENERATIVE_ARCHITECTURES = ("causal_lm", "seq2seq")
SEQUENCE_ARCHITECTURES = ("rnn", "lstm", "gru", "transformer", "cnn1d")


# --- data -----------------------------------------------------------------------------------


class SplitConfig(Strict):
    """How rows are split into train, validation and test sets (a seeded permutation)."""

    val_fraction: float = Field(default=0.15, ge=0.0, le=0.5)
    test_fraction: float = Field(default=0.15, ge=0.0, le=0.5)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> "SplitConfig":
        if self.val_fraction + self.test_fraction > 0.8:
            raise ValueError("val_fraction + test_fraction must leave at least 20% of rows for training")
        return self


class ImageAugmentation(Strict):
    """Random changes to training images only, drawn from a generator seeded by (seed, epoch, image)."""

    horizontal_flip: bool = Field(default=True, description="mirror half of the training images")
    crop_padding: int = Field(default=2, ge=0, le=64, description="pixels of padding before a random crop back to size")


SUBWORD_VOCAB_SIZE = 8000


class TextTokenizer(Strict):
    """How a text-classification job cuts text into tokens; trained on the training split only."""

    kind: Literal["word", "bpe"] = Field(
        default="word", description="lower-cased words, or byte-level BPE subwords (the tokenizers library)")
    vocab_size: int | None = Field(default=None, ge=16, le=1_000_000,
                                   description="ids kept (default: 8000 for bpe, dataset.vocab_size for words)")


class DatasetRef(Strict):
    """Which data to train on, and which columns play which part."""

    id: str = Field(min_length=1, max_length=200, pattern=r"^(builtin:[a-z0-9_]+|dataset:[0-9]+)$")
    target: str | None = Field(default=None, max_length=200)
    features: list[Annotated[str, Field(max_length=200)]] | None = Field(default=None, max_length=4096)
    text_column: str | None = Field(default=None, max_length=200)
    image_column: str | None = Field(default=None, max_length=200, description="Parquet column of encoded images")
    task: Literal["classification", "regression", "forecasting", "text_classification", "image_classification",
                  "language_modeling", "sequence_to_sequence"] | None = None
    window: int | None = Field(default=None, ge=1, le=4096)
    horizon: int = Field(default=1, ge=1, le=512)
    max_tokens: int = Field(default=64, ge=1, le=4096)
    vocab_size: int = Field(default=20000, ge=16, le=1_000_000)
    tokenizer: TextTokenizer | None = Field(default=None, description="text classification: word (default) or subword tokens")
    image_size: int | None = Field(
        default=None, ge=4, le=512, description="side in pixels images are resized to (a built-in's own size, else 32)"
    )
    augment: ImageAugmentation | None = None
    normalize: bool = True
    split: SplitConfig = SplitConfig()

    @property
    def token_vocab_size(self) -> int:
        """The most token ids a text-classification tokenizer keeps."""
        # Read from the values alone (never from which fields were set): the stored spec is a
        # full dump, so a worker's re-parse must give the same answer as the submit's.
        if self.tokenizer is not None and self.tokenizer.vocab_size is not None:
            return self.tokenizer.vocab_size
        if self.tokenizer is not None and self.tokenizer.kind == "bpe":
            return SUBWORD_VOCAB_SIZE
        return self.vocab_size

    @field_validator("id")
    @classmethod
    def _upload_id_in_range(cls, value: str) -> str:
        # An id past the column's range names no dataset; refuse it here rather than in the driver.
        prefix, _, number = value.partition(":")
        if prefix == "dataset" and int(number) > MAX_ID:
            raise ValueError(f"no dataset {value!r} (dataset ids are at most {MAX_ID})")
        return value


# --- training -------------------------------------------------------------------------------


class EarlyStopping(Strict):
    """Stop when ``metric`` has not improved for ``patience`` epochs."""

    metric: Literal[
        "train_loss", "val_loss", "val_accuracy", "val_f1", "val_rmse", "val_mae", "val_r2",
        "val_perplexity", "val_exact_match",
    ] = "val_loss"
    mode: Literal["min", "max"] | None = None
    patience: int = Field(default=5, ge=1, le=10000)
    min_delta: float = Field(default=0.0, ge=0.0)


class Hyperparameters(Strict):
    """Optimisation settings; defaults suit the small built-in datasets."""

    epochs: int = Field(default=10, ge=1, le=10000)
    batch_size: int = Field(default=64, ge=1, le=65536)
    learning_rate: float = Field(default=1e-3, gt=0.0, le=10.0)
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    scheduler: Literal["none", "step", "cosine", "linear", "onecycle"] = "none"
    step_size: int = Field(default=10, ge=1, le=10000)
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    warmup_epochs: int = Field(default=0, ge=0, le=1000)
    warmup_steps: int = Field(default=0, ge=0, le=1_000_000, description="warm-up in optimizer steps (adds to warmup_epochs)")
    grad_clip: float | None = Field(default=None, gt=0.0)
    grad_accum_steps: int = Field(default=1, ge=1, le=1024)
    early_stopping: EarlyStopping | None = None
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    log_every_steps: int = Field(default=50, ge=1, le=1_000_000)


class Resources(Strict):
    """Where the job runs."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus: int = Field(default=1, ge=1, le=16)
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class CheckpointPolicy(Strict):
    """How often to checkpoint and how many to keep (the best is always kept)."""

    every_epochs: int = Field(default=1, ge=1, le=10000)
    keep_last: int = Field(default=3, ge=1, le=100)


WEBHOOK_EVENTS = ("running", "progress", "checkpoint", "succeeded", "failed", "cancelled")
WebhookEvent = Literal["running", "progress", "checkpoint", "succeeded", "failed", "cancelled"]
MAX_WEBHOOK_URL = 2000


class WebhookSpec(Strict):
    """Where to POST a job's events, and which ones (default: how it ended)."""

    url: str = Field(min_length=1, max_length=MAX_WEBHOOK_URL, description="an http or https URL")
    events: list[WebhookEvent] = Field(default=["succeeded", "failed", "cancelled"], min_length=1, max_length=6)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        # Destination checks that need settings or DNS (private addresses) happen at submit, in
        # app.webhooks.check_destination; this is the shape alone.
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ValueError(f"not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        if not parts.hostname:
            raise ValueError("must name a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials (user:password@); authenticate with the signature")
        if parts.fragment:
            raise ValueError("must not have a #fragment")
        if any(c.isspace() or ord(c) < 32 for c in value):
            raise ValueError("must not contain spaces or control characters")
        return value

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists an event twice")
        return value


Metadata = dict[Annotated[str, Field(max_length=64)], Union[str, int, float, bool, None]]


class AttemptRuntime(Strict):
    """Base of job specs: the per-attempt runtime bound, and its old name accepted on input."""

    @model_validator(mode="before")
    @classmethod
    def _rename_max_runtime_s(cls, data: Any) -> Any:
        # ``max_runtime_s`` always bounded one attempt; the new name says so. Stored specs and
        # older clients still send the old name, so it is read as an alias (never written).
        if isinstance(data, dict) and "max_runtime_s" in data:
            if "max_attempt_runtime_s" in data:
                raise SpecError.at("max_runtime_s", "max_runtime_s is the old name of max_attempt_runtime_s; give one")
            data = {("max_attempt_runtime_s" if k == "max_runtime_s" else k): v for k, v in data.items()}
        return data


class TrainSpec(AttemptRuntime):
    """A training job."""

    kind: Literal["train"]
    name: Name
    model: ModelConfig
    dataset: DatasetRef
    hyperparameters: Hyperparameters = Hyperparameters()
    resources: Resources = Resources()
    checkpoint: CheckpointPolicy = CheckpointPolicy()
    init_from: str | None = Field(default=None, max_length=200, description="model to fine-tune")
    priority: Literal["low", "normal", "high"] = "normal"
    max_attempt_runtime_s: int = Field(
        default=86400, ge=1, le=30 * 86400,
        description="seconds one attempt may run; a retry or requeue starts a fresh budget (old name: max_runtime_s)",
    )
    max_attempts: int | None = Field(default=None, ge=1, le=20)
    metadata: Metadata = Field(default_factory=dict, max_length=50)
    webhook: WebhookSpec | None = None

    @model_validator(mode="after")
    def _text_settings_agree(self) -> "TrainSpec":
        if getattr(self.model, "tfidf", None) is not None and self.dataset.tokenizer is not None:
            raise SpecError.at("dataset.tokenizer", "model.tfidf reads word n-grams of its own; drop dataset.tokenizer")
        if self.dataset.tokenizer is not None and self.model.arch in ("causal_lm", "seq2seq", "pretrained"):
            where = "model.tokenizer" if self.model.arch != "pretrained" else "model.base"
            raise SpecError.at("dataset.tokenizer", f"{self.model.arch} has its own tokenizer ({where}); drop dataset.tokenizer")
        return self


# A row is a string (text models) or a list; its values are checked against the model version's
# input schema at submit (app.jobs.service), which names the row and field of a bad value.
InputRow = Union[str, list[Any]]
MAX_EXPLAINED_INPUTS = 100


class ExplainConfig(Strict):
    """How predictions are explained: integrated gradients (any model) or attention maps (transformers)."""

    method: Literal["integrated_gradients", "attention"] = "integrated_gradients"
    steps: int = Field(default=64, ge=1, le=1024, description="integration steps (integrated_gradients)")


class PredictSpec(AttemptRuntime):
    """A prediction job: a trained model and inline inputs, or an uploaded dataset to predict row by row."""

    kind: Literal["predict"]
    name: Name | None = None
    model: str = Field(min_length=1, max_length=200, description="training job id, name@version|latest, or pretrained:<catalog name> (embeddings)")
    inputs: list[InputRow] | None = Field(default=None, min_length=1, max_length=10000)
    dataset: str | None = Field(
        default=None, pattern=r"^dataset:[0-9]{1,10}$",
        description="an uploaded dataset (dataset:<id>) predicted in chunks into a JSONL output file, in place of inputs",
    )
    explain: Union[bool, ExplainConfig] = Field(
        default=False, description="true: integrated gradients with the default steps; or {method, steps}")
    output: Literal["prediction", "embedding"] = Field(
        default="prediction", description="embedding: normalised sentence embeddings (pretrained models only)")
    compare_with: list[Annotated[str, Field(max_length=100_000)]] | None = Field(
        default=None, min_length=1, max_length=10000,
        description="texts whose cosine similarity to each input is returned (output: embedding)")
    prompt: str | None = Field(default=None, max_length=100_000, description="text generation: one prompt (or a list in inputs)")
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="text generation: tokens to write at most")
    temperature: float = Field(default=1.0, ge=0.0, le=10.0, description="text generation: 0 is greedy")
    top_k: int | None = Field(default=None, ge=1, le=100_000, description="text generation: sample among the k likeliest")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="text generation: nucleus sampling mass")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="text generation: same seed, same text")
    stop: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=16, description="text generation: strings that end the text (not included)")
    beam_size: int = Field(default=1, ge=1, le=16, description="seq2seq: beams (1 is greedy)")
    priority: Literal["low", "normal", "high"] = "normal"
    max_attempt_runtime_s: int = Field(
        default=600, ge=1, le=86400,
        description="seconds one attempt may run; a retry or requeue starts a fresh budget (old name: max_runtime_s)",
    )
    max_attempts: int | None = Field(default=None, ge=1, le=20)
    metadata: Metadata = Field(default_factory=dict, max_length=50)
    webhook: WebhookSpec | None = None

    @model_validator(mode="after")
    def _embedding_options(self) -> "PredictSpec":
        if self.compare_with is not None and self.output != "embedding":
            raise ValueError("compare_with needs output: embedding")
        if self.model.startswith("pretrained:") and self.output != "embedding":
            raise ValueError("a catalog model without fine-tuning only gives embeddings; set output: embedding")
        return self

    @field_validator("dataset")
    @classmethod
    def _dataset_id_in_range(cls, value: str | None) -> str | None:
        if value is not None and int(value.split(":", 1)[1]) > MAX_ID:
            raise ValueError(f"no dataset {value!r} (dataset ids are at most {MAX_ID})")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "PredictSpec":
        if sum(source is not None for source in (self.inputs, self.dataset, self.prompt)) != 1:
            raise ValueError("give exactly one of inputs (rows), prompt (text generation) or dataset (dataset:<id>)")
        return self

    @field_validator("inputs")
    @classmethod
    def _finite_values(cls, inputs: list | None) -> list | None:
        # JSON has no NaN or infinity, but Python's json writes them; refused here, naming the
        # value (a SpecError passes through pydantic unchanged, so its field path is kept).
        for i, row in enumerate(inputs or ()):
            if isinstance(row, str):
                continue
            for j, value in enumerate(row):
                for k, part in enumerate(value if isinstance(value, list) else [value]):
                    if isinstance(part, float) and not math.isfinite(part):
                        where = f"inputs[{i}][{j}]" + (f"[{k}]" if isinstance(value, list) else "")
                        raise SpecError.at(where, f"expected a finite number, got {part}")
        return inputs

    @model_validator(mode="after")
    def _explained_inputs_bounded(self) -> "PredictSpec":
        if self.explanation is not None and len(self.inputs or ()) > MAX_EXPLAINED_INPUTS:
            raise ValueError(f"explain takes at most {MAX_EXPLAINED_INPUTS} inputs per job "
                             f"(integrated gradients cost steps x inputs forward passes); got {len(self.inputs)}")
        return self

    @property
    def explanation(self) -> ExplainConfig | None:
        """The explanation asked for, if any (``true`` means integrated gradients with default steps)."""
        if self.explain is True:
            return ExplainConfig()
        return self.explain or None

    def prompts(self) -> list[str]:
        """The texts a generation job continues: ``prompt``, else ``inputs``."""
        return [self.prompt] if self.prompt is not None else list(self.inputs or [])


# Predict fields that only text generation reads (a classifier refuses them at submit).
GENERATION_FIELDS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "beam_size")

JobSpec = Annotated[Union[TrainSpec, PredictSpec], Field(discriminator="kind")]
_adapter: TypeAdapter[TrainSpec | PredictSpec] = TypeAdapter(JobSpec)


def _field_path(loc: tuple[Any, ...]) -> str:
    # Drop the discriminator tags pydantic inserts ("train", "mlp") so the path reads as the JSON.
    parts: list[str] = []
    for i, item in enumerate(loc):
        if i == 0 and item in ("train", "predict"):
            continue
        if isinstance(item, str) and item in ARCHITECTURES and parts and parts[-1] == "model":
            continue
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts) or "(body)"


def parse_spec(payload: Any) -> TrainSpec | PredictSpec:
    """Validate a JSON payload into a spec, or raise :class:`SpecError` naming each bad field."""
    if not isinstance(payload, dict):
        raise SpecError.at("(body)", "the job spec must be a JSON object")
    try:
        return _adapter.validate_python(payload)
    except ValidationError as exc:
        raise SpecError(
            [{"field": _field_path(tuple(e["loc"])), "message": e["msg"]} for e in exc.errors()]
        ) from None


# --- serving settings of a model version or alias -------------------------------------------


class ServingSettings(Strict):
    """Micro-batch limits of one model version's predictions (null: the global KILN_PREDICT_* setting)."""

    max_batch_size: StrictInt | None = Field(default=None, ge=1, le=1024,
                                             description="predictions run in one forward pass at most")
    max_delay_ms: StrictInt | None = Field(default=None, ge=0, le=1000,
                                           description="how long a batch that found company waits for more")


class AliasServing(ServingSettings):
    """An alias's limits (null: its version's, then the global setting) and whether workers load it at start."""

    warm: StrictBool = Field(default=False, description="prediction workers load this alias's version when they start")


def parse_serving(payload: Any, *, alias: bool, prefix: str = "") -> ServingSettings:
    """Validate serving settings (an alias's carry ``warm`` too), or raise :class:`SpecError` naming each field."""
    if not isinstance(payload, dict):
        raise SpecError.at(prefix or "(body)", "serving settings must be a JSON object like {\"max_batch_size\": 16}")
    try:
        return (AliasServing if alias else ServingSettings).model_validate(payload)
    except ValidationError as exc:
        raise SpecError(
            [{"field": ".".join(filter(None, [prefix, _field_path(tuple(e["loc"]))])), "message": e["msg"]}
             for e in exc.errors()]
        ) from None
