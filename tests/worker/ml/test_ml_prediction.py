"""Prediction turns raw rows into labels or values in original units, and says what is wrong with bad rows."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from app.jobs.errors import UserError
from worker.ml import prediction
from worker.ml.datasets import load_builtin_raw
from worker.ml.prediction import predict
from worker.ml.training import train


def _checkpoint(fake_hooks, spec) -> bytes:
    hooks = fake_hooks()
    train(spec, hooks=hooks)
    return hooks.checkpoints[-1].data


@pytest.fixture(scope="module")
def digits_model(fake_hooks, spec_for) -> bytes:
    """A small digits classifier."""
    return _checkpoint(fake_hooks, spec_for("cnn1d", "builtin:digits", model={"channels": [8]}, epochs=1))


def test_classification_output_shape(digits_model):
    x, _ = load_builtin_raw("digits")
    answer = predict(digits_model, [x[0].tolist(), x[1].tolist()])
    assert len(answer["predictions"]) == 2
    for p in answer["predictions"]:
        assert set(p) == {"class", "index", "probabilities"}
        assert len(p["probabilities"]) == 10 and sum(p["probabilities"]) == pytest.approx(1.0)
        assert p["class"] == p["index"] == int(np.argmax(p["probabilities"]))


def test_nested_rows_match_flat_rows(digits_model):
    x, _ = load_builtin_raw("digits")
    flat = predict(digits_model, [x[5].tolist()])
    nested = predict(digits_model, [x[5].reshape(8, 8).tolist()])
    assert flat == nested


def test_wrong_width_names_the_row(digits_model):
    x, _ = load_builtin_raw("digits")
    rows = [x[i].tolist() for i in range(4)]
    rows[3] = rows[3][:63]
    with pytest.raises(UserError, match=r"^inputs\[3\] has 63 values; the model expects 64$"):
        predict(digits_model, rows)
    with pytest.raises(UserError, match=r"inputs\[0\] is text"):
        predict(digits_model, ["seven"])
    with pytest.raises(UserError, match=r"inputs\[1\] is not a list of numbers"):
        predict(digits_model, [x[0].tolist(), [[1, 2], [3]]])


def test_regression_predicts_values_in_original_units(fake_hooks, spec_for):
    checkpoint = _checkpoint(fake_hooks, spec_for("mlp", "builtin:diabetes", model={"hidden_sizes": [16]}, epochs=20,
                                                  learning_rate=0.01))
    x, y = load_builtin_raw("diabetes")
    answer = predict(checkpoint, [x[i].tolist() for i in range(200)])["predictions"]
    values = np.array([p["value"] for p in answer])
    assert set(answer[0]) == {"value"}
    # Progression is measured in the tens to hundreds; standardised outputs would sit near 0.
    assert 50 < values.mean() < 250
    assert np.corrcoef(values, y[:200])[0, 1] > 0.5


def test_forecasting_predicts_the_horizon_in_original_units(fake_hooks, spec_for):
    checkpoint = _checkpoint(fake_hooks, spec_for("gru", "builtin:sunspots", model={"hidden_size": 8},
                                                  epochs=3, data={"horizon": 3}))
    sig = prediction.signature(checkpoint)
    assert sig["input_shape"] == [24, 1] and sig["horizon"] == 3
    series, _ = load_builtin_raw("sunspots")
    window = series[-24:, 0].tolist()
    answer = predict(checkpoint, [window, [[v] for v in window]])["predictions"]
    assert answer[0] == answer[1]
    assert len(answer[0]["values"]) == 3
    assert all(0 < v < 300 for v in answer[0]["values"])


def test_text_model_wants_strings(tmp_path, fake_hooks, spec_for):
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "\n".join(f"good {i} day,pos\nbad {i} night,neg" for i in range(10)) + "\n")
    hooks = fake_hooks()
    train(spec_for("transformer", "dataset:2", model={"d_model": 8, "nhead": 2, "num_layers": 1}, epochs=1,
                   data={"text_column": "text"}), hooks=hooks, dataset_file=path, dataset_format="csv")
    checkpoint = hooks.checkpoints[-1].data
    answer = predict(checkpoint, ["a good day", "", "words never seen"])["predictions"]
    assert len(answer) == 3 and all(p["class"] in ("neg", "pos") for p in answer)
    with pytest.raises(UserError, match=r"inputs\[1\] must be a text string"):
        predict(checkpoint, ["fine", [1, 2, 3]])


def test_serving_cache_loads_each_checkpoint_once(digits_model, monkeypatch):
    prediction.clear_cache()
    decodes = []
    original = prediction.checkpoints.decode
    monkeypatch.setattr(prediction.checkpoints, "decode", lambda data: decodes.append(1) or original(data))
    x, _ = load_builtin_raw("digits")
    for _ in range(3):
        predict(digits_model, [x[0].tolist()])
    assert len(decodes) == 1


def test_the_byte_bound_evicts_the_least_recently_used_model(fake_hooks, spec_for, monkeypatch):
    # Three iris MLPs of one architecture (equal sizes), different weights (1, 2, 3 epochs): three checkpoints.
    models = [_checkpoint(fake_hooks, spec_for("mlp", "builtin:iris", model={"hidden_sizes": [16]}, epochs=n))
              for n in (1, 2, 3)]
    digests = [hashlib.sha256(m).hexdigest() for m in models]
    assert len(set(digests)) == 3
    prediction.clear_cache()
    size = prediction.load_model(models[0], torch.device("cpu")).size_bytes
    assert size > 0
    decodes = []
    original = prediction.checkpoints.decode
    monkeypatch.setattr(prediction.checkpoints, "decode", lambda data: decodes.append(1) or original(data))
    row = [[5.1, 3.5, 1.4, 0.2]]
    try:
        prediction.configure_cache(models=8, max_bytes=2 * size + size // 2)  # room for two, not three
        predict(models[0], row)  # cached already: no decode
        predict(models[1], row)
        predict(models[0], row)  # 0 is now the most recently used; 1 the least
        predict(models[2], row)  # three do not fit: 1 goes
        assert len(decodes) == 2
        assert [key[0] for key in prediction.cache_keys()] == [digests[0], digests[2]]
        assert not prediction.cached(digests[1])
        predict(models[1], row)  # a miss reads it again, and pushes out 0 (least recent now)
        assert len(decodes) == 3
        assert [key[0] for key in prediction.cache_keys()] == [digests[2], digests[1]]

        # A model bigger than the whole bound is served but not kept, (the bound changed first: all evicted).
        prediction.configure_cache(models=8, max_bytes=size - 1)
        assert prediction.cache_keys() == []
        first = predict(models[0], row)
        assert predict(models[0], row) == first and len(decodes) == 5
        assert prediction.cache_keys() == []
    finally:
        prediction.configure_cache(models=prediction.CACHE_SIZE, max_bytes=prediction.CACHE_BYTES)
        prediction.clear_cache()
