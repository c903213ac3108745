"""Tiny CPU presets reach the quality a user expects from each task (seconds each)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from app.jobs.schemas import SplitConfig
from worker.ml.datasets import load_builtin_raw, split_indices
from worker.ml.prediction import predict
from worker.ml.training import train


@pytest.fixture(scope="module")
def digits_mlp(fake_hooks, spec_for):
    """A digits MLP trained with the default architecture for 10 epochs: (result, hooks)."""
    hooks = fake_hooks()
    result = train(spec_for("mlp", "builtin:digits", epochs=10, batch_size=64), hooks=hooks)
    return result, hooks


def test_digits_mlp_reaches_high_accuracy(digits_mlp):
    result, hooks = digits_mlp
    assert result.final_metrics["val_accuracy"] >= 0.93
    assert result.test_metrics["test_accuracy"] >= 0.95
    assert result.test_metrics["test_f1"] >= 0.95
    assert hooks.scope("test")[0][2] == result.test_metrics


def test_digits_mlp_classifies_held_out_raw_digits(digits_mlp):
    result, hooks = digits_mlp
    best = next(c for c in reversed(hooks.checkpoints) if c.is_best)
    x, y = load_builtin_raw("digits")
    held_out = split_indices(1797, SplitConfig())[2][:50]
    predictions = predict(best.data, [x[i].tolist() for i in held_out])["predictions"]
    correct = sum(p["class"] == int(y[i]) for p, i in zip(predictions, held_out))
    assert correct >= 45, f"{correct}/50 held-out digits classified correctly"


def test_digits_lstm_reads_rows_as_sequences(fake_hooks, spec_for):
    spec = spec_for("lstm", "builtin:digits", model={"hidden_size": 64}, epochs=8, batch_size=64, learning_rate=0.005)
    result = train(spec, hooks=fake_hooks())
    assert result.signature["sequence_shape"] == [8, 8]
    assert result.final_metrics["val_accuracy"] >= 0.9
    assert result.test_metrics["test_accuracy"] >= 0.9


def test_digits_transformer(fake_hooks, spec_for):
    spec = spec_for("transformer", "builtin:digits", epochs=10, batch_size=64, learning_rate=0.003,
                    model={"d_model": 32, "nhead": 4, "num_layers": 1, "dim_feedforward": 64, "dropout": 0.0})
    result = train(spec, hooks=fake_hooks())
    assert result.final_metrics["val_accuracy"] >= 0.9
    assert result.test_metrics["test_accuracy"] >= 0.9


def test_breast_cancer_mlp(fake_hooks, spec_for):
    result = train(spec_for("mlp", "builtin:breast_cancer", model={"hidden_sizes": [32]}, epochs=15), hooks=fake_hooks())
    assert result.test_metrics["test_accuracy"] >= 0.95
    assert result.final_metrics["val_accuracy"] >= 0.95


def test_diabetes_regression_reports_rmse_in_original_units(fake_hooks, spec_for):
    result = train(spec_for("mlp", "builtin:diabetes", model={"hidden_sizes": [32]}, epochs=30,
                            learning_rate=0.003, weight_decay=0.01), hooks=fake_hooks())
    _, y = load_builtin_raw("diabetes")
    # Targets range 25..346 (std ~77): an RMSE in original units is tens, not a fraction of one.
    assert 35 < result.test_metrics["test_rmse"] < 70
    assert result.test_metrics["test_r2"] > 0.3
    assert y.std() > result.test_metrics["test_rmse"]


def test_sunspots_lstm_beats_the_naive_forecast(fake_hooks, spec_for):
    spec = spec_for("lstm", "builtin:sunspots", model={"hidden_size": 32}, epochs=60, batch_size=32,
                    learning_rate=0.01)
    result = train(spec, hooks=fake_hooks())
    metrics = result.test_metrics
    # The naive forecast repeats last year's value; check the reported baseline independently.
    series, _ = load_builtin_raw("sunspots")
    series = series[:, 0]
    n = result.signature["rows"]["test"]
    naive = np.sqrt(np.mean((series[-n:] - series[-n - 1:-1]) ** 2))
    assert metrics["test_naive_rmse"] == pytest.approx(naive, rel=1e-5)
    assert metrics["test_rmse"] <= 0.85 * metrics["test_naive_rmse"]


TOPICS = {
    "sport": "goal match team score player coach league win stadium referee",
    "food": "recipe oven flour butter taste bake dinner spice kitchen sugar",
    "money": "bank loan interest market stock price budget invest credit tax",
}
FILLER = "the a of and today we it was very really about this that my our".split()


def text_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """Generated sentences: a few topic words among common filler, labelled by topic."""
    rng = np.random.default_rng(seed)
    labels, texts = [], []
    for _ in range(rows):
        label = rng.choice(sorted(TOPICS))
        topic = TOPICS[label].split()
        words = list(rng.choice(topic, size=3)) + list(rng.choice(FILLER, size=int(rng.integers(3, 9))))
        rng.shuffle(words)
        labels.append(str(label))
        texts.append(" ".join(words).capitalize() + ".")
    return pd.DataFrame({"review": texts, "topic": labels})


@pytest.mark.parametrize("arch,model", [("lstm", {"hidden_size": 32}), ("mlp", {"hidden_sizes": [32]})])
def test_text_classification_is_well_above_chance(tmp_path, fake_hooks, spec_for, arch, model):
    path = tmp_path / "reviews.csv"
    text_frame(450).to_csv(path, index=False)
    spec = spec_for(arch, "dataset:9", model=model, epochs=12, learning_rate=0.01,
                    data={"text_column": "review", "target": "topic", "max_tokens": 16})
    hooks = fake_hooks()
    result = train(spec, hooks=hooks, dataset_file=path, dataset_format="csv")
    assert result.signature["task"] == "text_classification"
    assert result.test_metrics["test_accuracy"] >= 0.85  # chance is 1/3
    answer = predict(hooks.checkpoints[-1].data, ["The coach saw the team score a goal", "we bake bread with butter"])
    assert [p["class"] for p in answer["predictions"]] == ["sport", "food"]
