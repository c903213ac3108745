"""Job specs: valid ones parse with defaults, invalid ones name the field."""

from __future__ import annotations

import pytest

from app.jobs.errors import SpecError
from app.jobs.schemas import ARCHITECTURES, PredictSpec, TrainSpec, parse_spec


def train(**over):
    spec = {"kind": "train", "name": "digits-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"}}
    spec.update(over)
    return spec


def fields_of(exc: SpecError) -> set[str]:
    return {e["field"] for e in exc.errors}


def test_minimal_train_spec_gets_defaults():
    spec = parse_spec(train())
    assert isinstance(spec, TrainSpec)
    assert spec.hyperparameters.epochs == 10 and spec.checkpoint.keep_last == 3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_parses(arch):
    required = {"base": "minilm-l6"} if arch == "pretrained" else {}
    assert parse_spec(train(model={"arch": arch, **required})).model.arch == arch


@pytest.mark.parametrize(
    "payload,field",
    [
        (train(model={"arch": "resnet"}), "model"),
        (train(hyperparameters={"epochs": -1}), "hyperparameters.epochs"),
        (train(hyperparameters={"learning_rate": 0}), "hyperparameters.learning_rate"),
        (train(hyperparameters={"optimizer": "lion"}), "hyperparameters.optimizer"),
        (train(dataset={"id": "http://evil/x.csv"}), "dataset.id"),
        (train(model={"arch": "transformer", "d_model": 30, "nhead": 4}), "model"),
        (train(model={"arch": "mlp", "hidden": 3}), "model.hidden"),
        (train(name="../etc"), "name"),
        ({"kind": "predict", "model": "1", "inputs": []}, "inputs"),
        ({"kind": "deploy"}, "(body)"),
    ],
)
def test_invalid_specs_name_the_field(payload, field):
    with pytest.raises(SpecError) as info:
        parse_spec(payload)
    assert field in fields_of(info.value) or any(f.startswith(field) for f in fields_of(info.value)), info.value.errors


def test_non_object_body_is_refused():
    with pytest.raises(SpecError):
        parse_spec([1, 2])


def test_predict_spec_accepts_flat_nested_and_text_rows():
    spec = parse_spec({"kind": "predict", "model": "digits@latest", "inputs": [[1, 2], [[1], [2]], "some text"]})
    assert isinstance(spec, PredictSpec) and len(spec.inputs) == 3


@pytest.mark.parametrize("kind_fields", [
    {"kind": "train", "name": "a", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"}},
    {"kind": "predict", "model": "a@latest", "inputs": [[1.0]]},
])
def test_max_runtime_s_is_read_as_the_per_attempt_bound_and_stored_under_its_new_name(kind_fields):
    spec = parse_spec({**kind_fields, "max_runtime_s": 42})
    assert spec.max_attempt_runtime_s == 42
    stored = spec.model_dump(mode="json")
    assert stored["max_attempt_runtime_s"] == 42 and "max_runtime_s" not in stored
    assert parse_spec(stored) == spec
    assert parse_spec({**kind_fields, "max_attempt_runtime_s": 42}) == spec


def test_giving_both_runtime_names_is_an_error_naming_the_old_one():
    payload = {"kind": "train", "name": "a", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
               "max_runtime_s": 5, "max_attempt_runtime_s": 6}
    with pytest.raises(SpecError) as caught:
        parse_spec(payload)
    assert caught.value.errors[0]["field"] == "max_runtime_s" and "max_attempt_runtime_s" in str(caught.value)


@pytest.mark.parametrize("spec", [
    {"kind": "predict", "model": "m@1", "dataset": "dataset:3"},
    {"kind": "predict", "model": "m@1", "inputs": [[1, 2], "text"], "explain": {"method": "attention", "steps": 8}},
    {"kind": "predict", "model": "pretrained:minilm-l6", "inputs": ["a"], "output": "embedding",
     "compare_with": ["b"]},
])
def test_a_stored_prediction_spec_parses_again_as_the_worker_reads_it(spec):
    # The worker parses the stored JSON (every field written out, nulls included) before it claims.
    stored = parse_spec(spec).model_dump(mode="json")
    assert parse_spec(stored).model_dump(mode="json") == stored


TEXT = {"id": "dataset:1", "text_column": "text"}


@pytest.mark.parametrize(
    "payload,field,words",
    [
        (train(dataset={**TEXT, "tokenizer": {"kind": "wordpiece"}}), "dataset.tokenizer.kind", "word"),
        (train(dataset={**TEXT, "tokenizer": {"kind": "bpe", "vocab_size": 4}}), "dataset.tokenizer.vocab_size", "16"),
        (train(model={"arch": "mlp", "tfidf": {}}, dataset={**TEXT, "tokenizer": {"kind": "bpe"}}), "dataset.tokenizer",
         "n-grams"),
        (train(model={"arch": "causal_lm"}, dataset={**TEXT, "tokenizer": {"kind": "bpe"}}), "dataset.tokenizer",
         "own tokenizer"),
        (train(model={"arch": "mlp", "tfidf": {"ngram_max": 5}}), "model.tfidf.ngram_max", "3"),
        (train(model={"arch": "gru", "embedding_dropout": 1.0}), "model.embedding_dropout", "1"),
        (train(model={"arch": "cnn1d", "embedding_init": "glove"}), "model.embedding_init", "lsa"),
    ],
)
def test_text_settings_are_checked_with_a_clear_message(payload, field, words):
    with pytest.raises(SpecError) as info:
        parse_spec(payload)
    errors = info.value.errors
    assert any(e["field"].startswith(field) or field.startswith(e["field"]) for e in errors), errors
    assert any(words in e["message"] for e in errors), errors


def test_text_settings_parse_with_defaults():
    spec = parse_spec(train(model={"arch": "mlp", "tfidf": {}}, dataset=TEXT))
    assert spec.model.tfidf.ngram_max == 2 and spec.model.tfidf.max_features == 20000
    assert spec.model.embedding_dropout == 0.1 and spec.model.embedding_init == "lsa"
    bpe = parse_spec(train(model={"arch": "gru"}, dataset={**TEXT, "tokenizer": {"kind": "bpe"}})).dataset
    assert bpe.token_vocab_size == 8000
    assert parse_spec(train(dataset={**TEXT, "vocab_size": 500, "tokenizer": {"kind": "bpe"}})).dataset.token_vocab_size == 8000
    assert parse_spec(train(dataset={**TEXT, "tokenizer": {"kind": "word", "vocab_size": 300}})).dataset.token_vocab_size == 300
    assert parse_spec(train(dataset=TEXT)).dataset.token_vocab_size == 20000


def test_a_stored_text_spec_parses_back_to_the_same_settings():
    # The job row keeps the full dump; the worker parses it again and must read the same sizes.
    for dataset in ({**TEXT, "tokenizer": {"kind": "bpe"}}, {**TEXT, "tokenizer": {"kind": "bpe", "vocab_size": 300}},
                    {**TEXT, "vocab_size": 500}):
        spec = parse_spec(train(model={"arch": "gru"}, dataset=dataset))
        again = parse_spec(spec.model_dump(mode="json"))
        assert again == spec and again.dataset.token_vocab_size == spec.dataset.token_vocab_size
