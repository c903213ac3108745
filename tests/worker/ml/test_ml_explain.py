"""Explained predictions: integrated gradients are complete on every kind of model; attention maps are distributions."""

from __future__ import annotations

import numpy as np
import pytest

from app.jobs.errors import UserError
from worker.ml.datasets import load_builtin_raw
from worker.ml.prediction import predict
from worker.ml.training import train

STEPS = 128


def _checkpoint(fake_hooks, spec, **kwargs) -> bytes:
    hooks = fake_hooks()
    train(spec, hooks=hooks, **kwargs)
    return hooks.checkpoints[-1].data


def _assert_complete(explanation: dict) -> None:
    """|sum(attributions) - (f(x) - f(baseline))| <= 1e-2 * max(1, |f(x) - f(baseline)|), checked by hand.

    A text model's wide path reports its word n-grams' shares apart (``wide_attributions``); they count too.
    """
    shares = [*explanation["attributions"], *explanation.get("wide_attributions", [])]
    total = float(np.sum(np.asarray(shares, dtype=np.float64)))
    difference = explanation["output_difference"]
    tolerance = 1e-2 * max(1.0, abs(difference))
    assert abs(total - difference) <= tolerance, (total, difference)
    assert explanation["completeness_error"] <= tolerance
    assert abs(explanation["completeness_error"] - abs(total - difference)) < 1e-3 * max(1.0, abs(difference))


def test_integrated_gradients_are_complete_on_an_mlp(fake_hooks, spec_for):
    checkpoint = _checkpoint(fake_hooks, spec_for("mlp", "builtin:wine", model={"hidden_sizes": [16]}, epochs=3))
    x, _ = load_builtin_raw("wine")
    answer = predict(checkpoint, [x[0].tolist(), x[100].tolist()],
                     explain={"method": "integrated_gradients", "steps": STEPS})["predictions"]
    for p in answer:
        e = p["explanation"]
        assert e["method"] == "integrated_gradients" and e["steps"] == STEPS
        assert len(e["attributions"]) == 13 and e["baseline"]["kind"] == "training mean"
        assert e["target"] == f"logit of class {p['class']!r}"
        assert abs(e["output_difference"]) > 1e-3  # something to attribute
        _assert_complete(e)
    # The baseline is the training mean, in the units the inputs were sent in.
    assert answer[0]["explanation"]["baseline"]["values"] == pytest.approx(x.mean(axis=0).tolist(), rel=0.2)


def test_integrated_gradients_are_complete_on_an_lstm_per_step(fake_hooks, spec_for):
    checkpoint = _checkpoint(fake_hooks, spec_for("lstm", "builtin:sunspots", model={"hidden_size": 8}, epochs=2))
    series, _ = load_builtin_raw("sunspots")
    window = series[-24:, 0].tolist()
    plain = predict(checkpoint, [window])["predictions"][0]
    p = predict(checkpoint, [window], explain={"method": "integrated_gradients", "steps": STEPS})["predictions"][0]
    assert p["values"] == plain["values"]  # explaining does not change the answer
    e = p["explanation"]
    assert np.asarray(e["attributions"]).shape == (24, 1)  # time steps x features
    _assert_complete(e)


def test_integrated_gradients_are_complete_on_a_transformer_and_per_token_for_text(tmp_path, fake_hooks, spec_for):
    x, _ = load_builtin_raw("digits")
    digits = _checkpoint(fake_hooks, spec_for("transformer", "builtin:digits",
                                              model={"d_model": 8, "nhead": 2, "num_layers": 1}, epochs=1))
    e = predict(digits, [x[3].tolist()], explain={"method": "integrated_gradients", "steps": STEPS})
    e = e["predictions"][0]["explanation"]
    assert np.asarray(e["attributions"]).shape == (64,)
    _assert_complete(e)

    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "\n".join(f"good {i} day,pos\nbad {i} night,neg" for i in range(10)) + "\n")
    text = _checkpoint(fake_hooks, spec_for("transformer", "dataset:2", model={"d_model": 8, "nhead": 2, "num_layers": 1},
                                            epochs=2, data={"text_column": "text"}),
                       dataset_file=path, dataset_format="csv")
    p = predict(text, ["a good day", "bad night"], explain={"method": "integrated_gradients", "steps": STEPS})
    first, second = (q["explanation"] for q in p["predictions"])
    assert first["tokens"] == ["<unk>", "good", "day"] and second["tokens"] == ["bad", "night"]
    assert len(first["attributions"]) == 3 and len(second["attributions"]) == 2
    # The wide path reads the whole text's words (two letters or more) and their pairs, known from training.
    assert first["wide_terms"] == ["day", "good", "good day"] and len(first["wide_attributions"]) == 3
    assert second["wide_terms"] == ["bad", "bad night", "night"]
    _assert_complete(first)
    _assert_complete(second)
    # The difference explained is the whole network's, wide path (model.wide, on by default) included.
    import torch

    from worker.ml.prediction import encode_inputs, load_model

    loaded = load_model(text, torch.device("cpu"))
    assert loaded.network.wide is not None
    ids = encode_inputs(loaded, ["a good day", "bad night"])
    network = loaded.network
    with torch.no_grad():  # the baseline: padding embeddings under the real text's mask
        logits = network(ids)
        tokens = network.split(ids)[0]
        start = network.head(network.body(network.embedding(torch.zeros_like(tokens)), tokens != 0))
    for row, e in enumerate((first, second)):
        target = int(logits[row].argmax())
        assert e["output_difference"] == pytest.approx(float(logits[row, target] - start[row, target]), abs=1e-4)


def test_attention_maps_have_one_distribution_per_row(tmp_path, fake_hooks, spec_for):
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "\n".join(f"good {i} day,pos\nbad {i} night,neg" for i in range(10)) + "\n")
    text = _checkpoint(fake_hooks, spec_for("transformer", "dataset:2",
                                            model={"d_model": 8, "nhead": 2, "num_layers": 2, "pooling": "cls"},
                                            epochs=1, data={"text_column": "text"}),
                       dataset_file=path, dataset_format="csv")
    p = predict(text, ["a good day", "bad"], explain={"method": "attention", "steps": 1})["predictions"]
    first, second = p[0]["explanation"], p[1]["explanation"]
    assert first["positions"] == ["[CLS]", "<unk>", "good", "day"]
    maps = np.asarray(first["attention"])
    assert maps.shape == (2, 2, 4, 4)  # layers x heads x seq x seq, [CLS] included
    assert np.allclose(maps.sum(axis=-1), 1.0, atol=1e-5) and (maps >= 0).all()
    assert np.asarray(second["attention"]).shape == (2, 2, 2, 2)
    assert np.allclose(np.asarray(second["attention"]).sum(axis=-1), 1.0, atol=1e-5)


def test_attention_is_refused_for_a_model_without_attention(fake_hooks, spec_for):
    checkpoint = _checkpoint(fake_hooks, spec_for("mlp", "builtin:iris", model={"hidden_sizes": [4]}, epochs=1))
    x, _ = load_builtin_raw("iris")
    with pytest.raises(UserError, match="attention maps exist only for transformer models"):
        predict(checkpoint, [x[0].tolist()], explain={"method": "attention", "steps": 1})
