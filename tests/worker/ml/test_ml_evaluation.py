"""Evaluation metrics are scikit-learn's: macro F1, RMSE, MAE, R² (constant targets and horizons too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, mean_absolute_error, r2_score, root_mean_squared_error

from worker.ml.evaluation import evaluate, macro_f1, regression_metrics
from worker.ml.preparation import Standardizer


def test_macro_f1_is_scikit_learns_including_a_class_only_predicted():
    truth = np.array([0, 0, 1, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0, 3])  # class 3 never occurs in truth
    assert macro_f1(truth, predicted) == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    assert macro_f1(truth, truth) == 1.0


def test_macro_f1_equals_scikit_learns_on_random_labels_with_absent_classes():
    rng = np.random.default_rng(1)
    for _ in range(200):
        k = int(rng.integers(2, 12))
        truth = rng.integers(0, k, size=int(rng.integers(1, 60)))
        predicted = rng.integers(0, k, size=len(truth))
        expected = f1_score(truth, predicted, average="macro", zero_division=0)
        assert macro_f1(truth, predicted) == pytest.approx(expected, abs=1e-12), (truth, predicted)


def test_regression_metrics_are_scikit_learns():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=50)
    predicted = truth + rng.normal(scale=0.3, size=50)
    got = regression_metrics(truth, predicted)
    assert got["rmse"] == pytest.approx(root_mean_squared_error(truth, predicted))
    assert got["mae"] == pytest.approx(mean_absolute_error(truth, predicted))
    assert got["r2"] == pytest.approx(r2_score(truth, predicted))


def test_r2_of_a_constant_target_is_one_when_exact_and_zero_otherwise():
    constant = np.full(10, 3.0)
    assert regression_metrics(constant, constant)["r2"] == 1.0 == r2_score(constant, constant)
    off = constant + 0.5
    assert regression_metrics(constant, off)["r2"] == 0.0 == r2_score(constant, off)
    assert regression_metrics(constant, off)["rmse"] == pytest.approx(0.5)


class _Fixed(torch.nn.Module):
    """A 'model' whose outputs are given in advance, row by row."""

    def __init__(self, outputs: torch.Tensor):
        super().__init__()
        self.outputs = outputs
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.outputs[self.seen:self.seen + len(x)]
        self.seen += len(x)
        return out


def test_forecast_metrics_pool_every_horizon_step_in_original_units():
    rng = np.random.default_rng(1)
    windows, horizon = 12, 3
    x = torch.tensor(rng.normal(size=(windows, 5, 1)), dtype=torch.float32)
    # Steps on very different scales: a per-step average of R² would differ from the pooled one.
    y = torch.tensor(rng.normal(size=(windows, horizon)) * np.array([1.0, 5.0, 20.0]), dtype=torch.float32)
    out = y + torch.tensor(rng.normal(scale=0.5, size=(windows, horizon)), dtype=torch.float32)
    scale = Standardizer(mean=np.array([10.0]), std=np.array([2.0]))
    metrics = evaluate(_Fixed(out), x, y, task="forecasting", device=torch.device("cpu"), batch_size=5,
                       targets=scale)
    truth = (y.numpy().astype(np.float64) * 2.0 + 10.0).ravel()
    predicted = (out.numpy().astype(np.float64) * 2.0 + 10.0).ravel()
    assert metrics["rmse"] == pytest.approx(root_mean_squared_error(truth, predicted))
    assert metrics["mae"] == pytest.approx(mean_absolute_error(truth, predicted))
    assert metrics["r2"] == pytest.approx(r2_score(truth, predicted))
    assert metrics["r2"] != pytest.approx(r2_score(truth.reshape(windows, horizon), predicted.reshape(windows, horizon)))
    last = np.repeat(x[:, -1, 0].numpy().astype(np.float64)[:, None] * 2.0 + 10.0, horizon, axis=1).ravel()
    assert metrics["naive_rmse"] == pytest.approx(root_mean_squared_error(truth, last))


def test_classification_metrics_from_logits():
    truth = torch.tensor([0, 1, 2, 2, 1])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 2, 1]), 3).float() * 4.0
    metrics = evaluate(_Fixed(logits), torch.zeros(5, 2), truth, task="classification",
                       device=torch.device("cpu"), batch_size=2)
    assert metrics["accuracy"] == pytest.approx(0.8)
    assert metrics["f1"] == pytest.approx(f1_score(truth.numpy(), [0, 1, 1, 2, 1], average="macro"))
