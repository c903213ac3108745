"""The submission forms' fields, derived from the pydantic job specs, and the mapping form <-> spec <-> errors.

Every field is read off the spec models (type, default, bounds, ``Literal`` choices, description), so
the forms cannot drift from what ``POST /api/v1/jobs`` accepts. A field's HTML name is its spec path
(``hyperparameters.epochs``), which is also the path a ``SpecError`` names, so an error finds its field.
"""

from __future__ import annotations

import csv
import io
import json
import re
import types
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from werkzeug.datastructures import MultiDict

from app.jobs.errors import SpecError
from app.jobs.schemas import (
    ARCHITECTURES, GENERATION_FIELDS, CNN1DConfig, CNN2DConfig, CausalLMConfig, MLPConfig, PredictSpec, RecurrentConfig, Seq2SeqConfig,
    TrainSpec, TransformerConfig,
)

# ``webhook`` stays API-only: it needs a signing secret, which the API hands out (docs/api.md).
API_ONLY = ("kind", "webhook")

ARCH_CONFIGS: dict[str, type[BaseModel]] = {
    "mlp": MLPConfig, "rnn": RecurrentConfig, "lstm": RecurrentConfig, "gru": RecurrentConfig,
    "transformer": TransformerConfig, "cnn1d": CNN1DConfig, "cnn2d": CNN2DConfig,
    "causal_lm": CausalLMConfig, "seq2seq": Seq2SeqConfig,
}

# One line of help where the schema's Field has no description (a description, when there is one, wins).
HELP = {
    "name": "Letters, digits, '.', '_' or '-'.",
    "priority": "Higher priority jobs leave the queue first.",
    "max_attempts": "Blank: the server's default.",
    "metadata": "A JSON object of labels (strings, numbers, booleans).",
    "model.arch": "The network; its own settings follow.",
    "model.hidden_sizes": "Widths of the hidden layers, comma-separated (blank: none).",
    "model.dropout": "Share of activations dropped while training.",
    "model.activation": "Non-linearity between layers.",
    "model.hidden_size": "Width of the recurrent state.",
    "model.num_layers": "Stacked layers.",
    "model.bidirectional": "Read the sequence both ways.",
    "model.d_model": "Embedding width; must be divisible by the number of heads.",
    "model.nhead": "Attention heads.",
    "model.dim_feedforward": "Width of each layer's feed-forward block.",
    "model.positional": "How positions are encoded.",
    "model.pooling": "How the sequence becomes one vector.",
    "model.channels": "Channels of each convolution, comma-separated.",
    "model.kernel_size": "Width of each convolution.",
    "dataset.id": "A built-in dataset or one of your uploads.",
    "dataset.target": "The column to predict (blank: the dataset's own target).",
    "dataset.features": "Input columns (none chosen: every numeric column but the target).",
    "dataset.text_column": "The column holding text, for text classification.",
    "dataset.task": "Blank: inferred from the data.",
    "dataset.window": "Past steps a forecast reads (blank: the dataset's default).",
    "dataset.horizon": "Steps a forecast predicts.",
    "dataset.max_tokens": "Tokens kept per text.",
    "dataset.vocab_size": "Words kept in the vocabulary.",
    "dataset.tokenizer": "Cut text into subwords (BPE) instead of words.",
    "dataset.tokenizer.kind": "Words, or byte-level BPE subwords trained on the training split.",
    "dataset.tokenizer.vocab_size": "Token ids kept (blank: 8000 for BPE, the vocabulary size above for words).",
    "model.embedding_dropout": "Text: share of tokens dropped whole in training.",
    "model.embedding_init": "Text: start embeddings random, or from LSA of the training split.",
    "model.wide": "Text: add a linear TF-IDF model over the whole text's word n-grams to the logits.",
    "model.wide_ngram_max": "Text, wide path: longest word n-gram counted.",
    "model.wide_buckets": "Text, wide path: word n-grams kept beyond the vocabulary size.",
    "model.wide_min_gain": "Text, wide path: validation gain the network needs over the linear model to be kept.",
    "model.tfidf": "Text (MLP): read TF-IDF n-gram features instead of token embeddings.",
    "model.tfidf.ngram_max": "Longest word n-gram counted.",
    "model.tfidf.max_features": "Most frequent n-grams kept.",
    "model.tfidf.min_df": "Drop n-grams found in fewer training texts.",
    "model.tfidf.sublinear_tf": "Weigh a count c as 1 + log(c).",
    "dataset.normalize": "Standardize numeric columns with the training split's mean and spread.",
    "dataset.split.val_fraction": "Share of rows held out for validation.",
    "dataset.split.test_fraction": "Share of rows held out for the final test.",
    "dataset.split.seed": "Seed of the split's shuffle.",
    "hyperparameters.epochs": "Passes over the training rows.",
    "hyperparameters.batch_size": "Rows per optimisation step.",
    "hyperparameters.learning_rate": "Step size of the optimizer.",
    "hyperparameters.optimizer": "The optimisation algorithm.",
    "hyperparameters.momentum": "SGD momentum (other optimizers ignore it).",
    "hyperparameters.weight_decay": "L2 penalty on the weights.",
    "hyperparameters.scheduler": "How the learning rate changes over the run.",
    "hyperparameters.step_size": "Epochs between learning-rate drops (step scheduler).",
    "hyperparameters.gamma": "Factor of each learning-rate drop (step scheduler).",
    "hyperparameters.warmup_epochs": "Epochs the learning rate ramps up.",
    "hyperparameters.grad_clip": "Clip the gradient norm to this (blank: no clipping).",
    "hyperparameters.grad_accum_steps": "Batches accumulated per optimizer step.",
    "hyperparameters.early_stopping": "Stop when a metric stops improving.",
    "hyperparameters.early_stopping.metric": "The metric watched.",
    "hyperparameters.early_stopping.mode": "Blank: min for losses and errors, max for scores.",
    "hyperparameters.early_stopping.patience": "Epochs without improvement before stopping.",
    "hyperparameters.early_stopping.min_delta": "The least change that counts as improvement.",
    "hyperparameters.seed": "Seed of the weights and the shuffle order.",
    "hyperparameters.log_every_steps": "Steps between step metrics.",
    "resources.device": "auto: CUDA when the worker has it, else CPU.",
    "resources.gpus": "GPUs for this job.",
    "resources.precision": "auto: bf16 on CUDA where it helps, else fp32.",
    "checkpoint.every_epochs": "Epochs between checkpoints.",
    "checkpoint.keep_last": "Checkpoints kept (the best is always kept too).",
    "explain": "Also return each input's feature attributions.",
    "inputs": "One row per line as CSV (a header line is skipped), or a JSON list of rows.",
}
# Fields whose input is not read off their type: the choices come from the user's data.
WIDGETS = {"dataset.id": "dataset", "dataset.target": "column", "dataset.text_column": "column",
           "dataset.features": "columns", "init_from": "model_ref", "model": "model_ref", "inputs": "rows"}
LABELS = {"model.arch": "Architecture", "dataset.id": "Dataset", "init_from": "Fine-tune from",
          "max_attempt_runtime_s": "Max attempt runtime (s)", "model": "Model version", "nhead": "Heads",
          "d_model": "Model width (d_model)", "dim_feedforward": "Feed-forward width", "gpus": "GPUs",
          "inputs": "Rows", "grad_clip": "Gradient clip", "grad_accum_steps": "Gradient accumulation steps"}


@dataclass(frozen=True)
class FormField:
    """One input of a form: its spec path (also its HTML name), widget, default, bounds and help."""

    path: str
    widget: str  # number, checkbox, select, list, text, json, toggle, or one of WIDGETS' values
    kind: type = str  # int or float for numbers and lists
    optional: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    bounds: dict[str, float] = field(default_factory=dict)  # ge, gt, le, lt
    description: str = ""

    @property
    def id(self) -> str:
        """The HTML id (its label's ``for``)."""
        return "f-" + re.sub(r"[^a-z0-9]+", "-", self.path)

    @property
    def parent(self) -> str:
        """The path of the group holding this field ("" at the top)."""
        return self.path.rpartition(".")[0]

    @property
    def label(self) -> str:
        """What the label says."""
        leaf = self.path.rpartition(".")[2]
        return LABELS.get(self.path) or LABELS.get(leaf) or leaf.replace("_", " ").capitalize()

    @property
    def help(self) -> str:
        """One line: what it is, then its bounds."""
        text = self.description or HELP.get(self.path, "")
        text = (text[:1].upper() + text[1:]).rstrip(".")
        limits = self.limits
        return f"{text}. {limits[:1].upper() + limits[1:]}." if limits else (text + "." if text else "")

    @property
    def limits(self) -> str:
        """The bounds in words ("1 to 10000", "at least 0, below 1")."""
        b = self.bounds
        parts = []
        if "ge" in b:
            parts.append(f"at least {_num(b['ge'])}")
        if "gt" in b:
            parts.append(f"above {_num(b['gt'])}")
        if "le" in b:
            parts.append(f"at most {_num(b['le'])}")
        if "lt" in b:
            parts.append(f"below {_num(b['lt'])}")
        if "ge" in b and "le" in b:
            parts = [f"{_num(b['ge'])} to {_num(b['le'])}"]
        prefix = "each " if self.widget == "list" else ""
        return prefix + ", ".join(parts) if parts else ""

    @property
    def html_attrs(self) -> dict[str, Any]:
        """min/max/step for a number input (the browser's hint only: the server decides)."""
        if self.widget != "number":
            return {}
        attrs: dict[str, Any] = {"step": "1" if self.kind is int else "any"}
        low = self.bounds.get("ge", self.bounds.get("gt"))
        high = self.bounds.get("le", self.bounds.get("lt"))
        if low is not None:
            attrs["min"] = _num(low)
        if high is not None:
            attrs["max"] = _num(high)
        return attrs


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """The annotation without ``| None``, and whether None was allowed."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) < len(get_args(annotation)) and len(args) == 1:
            return args[0], True
    return annotation, False


def _bounds(metadata: list[Any]) -> dict[str, float]:
    found = {}
    for item in metadata:
        for key, cls in (("ge", at.Ge), ("gt", at.Gt), ("le", at.Le), ("lt", at.Lt)):
            if isinstance(item, cls):
                found[key] = getattr(item, key)
    return found


def fields_of(model: type[BaseModel], prefix: str = "", skip: tuple[str, ...] = ()) -> list[FormField]:
    """The form fields of a spec model, nested models flattened into dotted paths, in declaration order."""
    out: list[FormField] = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        path = f"{prefix}.{name}" if prefix else name
        annotation, optional = _unwrap(info.annotation)
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        common = {"optional": optional, "default": default, "bounds": _bounds(info.metadata),
                  "description": info.description or ""}
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if optional:  # an optional group: a checkbox turns it on, its fields follow
                out.append(FormField(path, "toggle", **{**common, "default": default is not None}))
            out.extend(fields_of(annotation, path))
            continue
        origin = get_origin(annotation)
        if path in WIDGETS:
            out.append(FormField(path, WIDGETS[path], **common))
        elif origin is Literal:
            out.append(FormField(path, "select", choices=tuple(get_args(annotation)), **common))
        elif annotation is bool:
            out.append(FormField(path, "checkbox", kind=bool, **common))
        elif annotation in (int, float):
            out.append(FormField(path, "number", kind=annotation, **common))
        elif origin is list:
            item = get_args(annotation)[0]
            item_bounds = {}
            if get_origin(item) is Annotated:
                item, *extra = get_args(item)
                item_bounds = _bounds([m for e in extra for m in getattr(e, "metadata", [e])])
            out.append(FormField(path, "list", kind=item, **{**common, "bounds": item_bounds}))
        elif origin is dict:
            out.append(FormField(path, "json", kind=dict, **common))
        else:
            out.append(FormField(path, "text", **common))
    return out


def train_fields(arch: str) -> list[FormField]:
    """The training form's fields with ``arch``'s own model fields (mlp's for an unknown one)."""
    config = ARCH_CONFIGS.get(arch, MLPConfig)
    arch_field = FormField("model.arch", "select", choices=ARCHITECTURES, default="mlp")
    out: list[FormField] = []
    for f in fields_of(TrainSpec, skip=API_ONLY):
        if f.path == "model":
            out.append(arch_field)
            out.extend(fields_of(config, "model", skip=("arch",)))
        else:
            out.append(f)
    return out


def predict_fields() -> list[FormField]:
    """The prediction form's fields."""
    # Embeddings (``output``, ``compare_with``) are API-only for now: the results table shows classes and values.
    # Text generation settings are API-only too; the job page streams a generation's text.
    return fields_of(PredictSpec, skip=API_ONLY + ("output", "compare_with") + GENERATION_FIELDS)


# --- values: what the inputs show ------------------------------------------------------------


def _display(f: FormField, value: Any) -> Any:
    if f.widget in ("checkbox", "toggle"):
        return bool(value)
    if value is None:
        return [] if f.widget == "columns" else ""
    if f.widget == "columns":
        return [str(v) for v in value]
    if f.widget == "list":
        return ", ".join(str(v) for v in value)
    if f.widget in ("json", "rows"):
        return json.dumps(value)
    return str(value)


def defaults(fields: list[FormField]) -> dict[str, Any]:
    """What a fresh form shows: every field's schema default."""
    return {f.path: _display(f, f.default) for f in fields}


def _lookup(spec: dict[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = spec
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def from_spec(fields: list[FormField], spec: dict[str, Any]) -> dict[str, Any]:
    """What a form prefilled with a stored spec shows (a clone); fields the spec lacks show defaults."""
    spec = dict(spec)
    if "max_runtime_s" in spec and "max_attempt_runtime_s" not in spec:
        spec["max_attempt_runtime_s"] = spec.pop("max_runtime_s")
    values = {}
    for f in fields:
        found, value = _lookup(spec, f.path)
        if f.widget == "toggle":
            value = found and value is not None
        values[f.path] = _display(f, value if found else f.default)
    return values


def from_form(fields: list[FormField], data: MultiDict, *, partial: bool = False) -> dict[str, Any]:
    """What the person typed; with ``partial`` (an htmx fragment's few inputs) a missing one shows its default."""
    values = {}
    for f in fields:
        if partial and f.path not in data:
            values[f.path] = _display(f, f.default)
        elif f.widget in ("checkbox", "toggle"):
            values[f.path] = f.path in data
        elif f.widget == "columns":
            values[f.path] = [v for v in data.getlist(f.path) if v]
        else:
            values[f.path] = data.get(f.path, "")
    return values


# --- values -> spec payload --------------------------------------------------------------------

_INT = re.compile(r"^[+-]?\d+$")


def _scalar(kind: type, raw: str) -> Any:
    """A typed value where the text is one; else the text, so the schema names the error as the API would."""
    text = raw.strip()
    try:
        if kind is int and _INT.match(text):
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        pass
    return text


def _set(payload: dict[str, Any], path: str, value: Any) -> None:
    *groups, leaf = path.split(".")
    node = payload
    for part in groups:
        node = node.setdefault(part, {})
    node[leaf] = value


def to_payload(
    fields: list[FormField], values: dict[str, Any], kind: str,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The JSON spec the API would get from these values, and errors found before the schema (unreadable JSON)."""
    payload: dict[str, Any] = {"kind": kind}
    errors: dict[str, list[str]] = {}
    off = [f.path for f in fields if f.widget == "toggle" and not values.get(f.path)]
    for f in fields:
        raw = values.get(f.path)
        if any(f.path.startswith(group + ".") for group in off):
            continue
        if f.widget == "toggle":
            if not raw:
                _set(payload, f.path, None)
            continue
        if f.widget == "checkbox":
            _set(payload, f.path, bool(raw))
        elif f.widget == "columns":
            # Checked boxes (an upload's columns) or one comma-separated text (a built-in's feature names).
            items = [c.strip() for v in (raw if isinstance(raw, list) else [raw]) for c in str(v or "").split(",")]
            items = [c for c in items if c]
            _set(payload, f.path, items or None)
        elif f.widget == "list":
            text = str(raw or "").strip()
            _set(payload, f.path, [_scalar(f.kind, c) for c in text.split(",")] if text else [])
        elif f.widget == "json":
            text = str(raw or "").strip()
            if not text:
                continue  # the schema's default (an empty object)
            try:
                _set(payload, f.path, json.loads(text))
            except ValueError as exc:
                errors.setdefault(f.path, []).append(f"not valid JSON: {exc}")
        elif f.widget == "rows":
            continue  # parsed by parse_rows from the text or the file
        else:
            text = str(raw or "").strip()
            if text == "":
                if f.optional:
                    _set(payload, f.path, None)
                elif f.widget == "number":
                    _set(payload, f.path, None)  # the schema says "a valid integer/number", as the API would for null
                else:
                    _set(payload, f.path, "")
            elif f.widget == "number":
                _set(payload, f.path, _scalar(f.kind, text))
            else:
                _set(payload, f.path, text)
    return payload, errors


def _cell(text: str) -> Any:
    text = text.strip()
    if _INT.match(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def parse_rows(text: str) -> list[Any]:
    """Prediction inputs from pasted or uploaded text: a JSON list of rows, or CSV (one row per line).

    A CSV line of one non-number is a text model's input; a first line without a single number,
    followed by a line of numbers, is a header and skipped. Raises ValueError with a message.
    """
    text = text.strip().lstrip("\ufeff")
    if not text:
        raise ValueError("paste rows (CSV or JSON) or choose a CSV file")
    if text[0] in "[{":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
        if isinstance(data, dict) and "inputs" in data:
            data = data["inputs"]
        if not isinstance(data, list):
            raise ValueError("JSON rows must be a list of rows, or an object with an 'inputs' list")
        return data
    lines = [row for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    rows = [[_cell(c) for c in row] for row in lines]
    if len(rows) > 1 and all(isinstance(c, str) for c in rows[0]) and not any(isinstance(c, str) for c in rows[1]):
        rows = rows[1:]
    out: list[Any] = []
    for number, row in enumerate(rows, start=1):
        if len(row) == 1 and isinstance(row[0], str):
            out.append(row[0])
            continue
        for column, cell in enumerate(row, start=1):
            if isinstance(cell, str):
                raise ValueError(f"line {number}, column {column}: {cell!r} is not a number")
        out.append(row)
    return out


# --- errors -> fields ----------------------------------------------------------------------------


def _base(path: str) -> str:
    return re.sub(r"\[\d+\]", "", path)


def field_errors(fields: list[FormField], exc: SpecError) -> tuple[dict[str, list[str]], list[str]]:
    """Each error of ``exc`` at the field it names (the API's message; a deeper path prefixes it),
    and the errors no field shows. A group's error (a model validator's) goes to the first of its
    fields the message names, else to the group's first field."""
    paths = [f.path for f in fields]
    by_field: dict[str, list[str]] = {}
    general: list[str] = []
    for error in exc.errors:
        where, message = error["field"], error["message"]
        base = _base(where)
        target = None
        if base in paths:
            target = base
            if where != base:
                message = f"{where}: {message}"
        elif ancestors := [p for p in paths if base.startswith(p + ".")]:
            target = max(ancestors, key=len)
            message = f"{where}: {message}"
        else:
            members = [p for p in paths if p.startswith(base + ".")] if base not in ("", "(body)") else []
            named = [p for p in members if re.search(rf"\b{re.escape(p.rpartition('.')[2])}\b", message)]
            target = (named or members or [None])[0]
        if target is None:
            general.append(f"{where}: {message}")
        else:
            by_field.setdefault(target, []).append(message)
    return by_field, general


@dataclass
class FormView:
    """A form as a template draws it: its fields, what they show, and the errors at each."""

    fields: list[FormField]
    values: dict[str, Any]
    errors: dict[str, list[str]] = field(default_factory=dict)
    general: list[str] = field(default_factory=list)

    def section(self, parent: str, exclude: tuple[str, ...] = ()) -> list[FormField]:
        """The fields directly inside group ``parent`` ("" for the top level)."""
        return [f for f in self.fields if f.parent == parent and f.path not in exclude]

    def get(self, path: str) -> FormField:
        """The field at ``path``."""
        return next(f for f in self.fields if f.path == path)

    @property
    def error_count(self) -> int:
        """How many errors the form shows."""
        return sum(len(v) for v in self.errors.values()) + len(self.general)
