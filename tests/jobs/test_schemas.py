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
