"""Losses and evaluation: the task's loss for training, and metrics in the data's own units."""

from __future__ import annotations

import warnings

import numpy as np
import sklearn
import torch
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error
from torch import nn
from torch.nn import functional as F

from app.catalog import CLASSIFYING_TASKS, GENERATIVE_TASKS, LANGUAGE_MODELING, SEQUENCE_TO_SEQUENCE
from worker.ml.devices import autocast_for
from worker.ml.preparation import FORECASTING, REGRESSION, Standardizer
from worker.ml.text_codecs import PAD_ID

CLASSIFYING = CLASSIFYING_TASKS


def loss_sum(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed loss of a batch (cross-entropy, or squared error on standardised targets)."""
    outputs = outputs.float()
    if task in GENERATIVE_TASKS:
        # Mean cross-entropy over a row's real tokens (padding targets are 0 and ignored), summed over rows.
        per_token = F.cross_entropy(outputs.transpose(1, 2), targets, reduction="none",
                                    ignore_index=-100 if task == LANGUAGE_MODELING else PAD_ID)
        counted = (targets != PAD_ID) if task != LANGUAGE_MODELING else torch.ones_like(targets, dtype=torch.bool)
        return (per_token.sum(dim=1) / counted.sum(dim=1).clamp(min=1)).sum()
    if task in CLASSIFYING:
        return F.cross_entropy(outputs, targets, reduction="sum")
    if task == REGRESSION:
        outputs = outputs.squeeze(-1)
    # Mean over the horizon so the loss per window does not grow with the horizon.
    return F.mse_loss(outputs, targets, reduction="none").reshape(len(targets), -1).mean(dim=1).sum()


def monitorable_metrics(task: str, *, has_validation: bool) -> list[str]:
    """Epoch metrics that can pick the best checkpoint or drive early stopping."""
    if not has_validation:
        return ["train_loss"]
    if task in GENERATIVE_TASKS:
        extra = ["val_exact_match"] if task == SEQUENCE_TO_SEQUENCE else []
        return ["train_loss", "val_loss", "val_perplexity", *extra]
    task_metrics = ("accuracy", "f1") if task in CLASSIFYING else ("rmse", "mae", "r2")
    return ["train_loss", "val_loss", *(f"val_{name}" for name in task_metrics)]


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Unweighted mean F1 over the classes that occur in truth or prediction (scikit-learn's macro F1).

    Computed from one confusion matrix (``np.bincount``): scikit-learn's ``f1_score`` gives the same
    number (tests/worker/ml/test_ml_evaluation.py) but costs ~5 ms of input checks per call, which
    every epoch of a job paid on the training thread.
    """
    truth, predicted = np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if truth.size == 0:
        return 0.0
    k = int(max(truth.max(), predicted.max())) + 1
    confusion = np.bincount(truth * k + predicted, minlength=k * k).reshape(k, k)
    hits, actual, guessed = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    present = (actual + guessed) > 0
    return float(np.mean(2 * hits[present] / (actual[present] + guessed[present])))


def regression_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """RMSE, MAE and R² (scikit-learn's) of values in original units, over all values of all outputs.

    A forecast's horizon steps are pooled (raveled), so R² compares with the mean of every target
    value, not a per-step mean. R² of a constant target is 1.0 if predicted exactly, else 0.0; of a
    single value it is undefined (NaN, stored as null).
    """
    truth, predicted = np.ravel(truth), np.ravel(predicted)
    # The inputs are finite float arrays made here: scikit-learn's argument checks (most of its cost
    # on validation-sized arrays, paid every epoch) would find nothing.
    with warnings.catch_warnings(), sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # one value: NaN says it already
        return {
            "rmse": float(root_mean_squared_error(truth, predicted)),
            "mae": float(mean_absolute_error(truth, predicted)),
            "r2": float(r2_score(truth, predicted)),
        }


def original_units(values: np.ndarray, targets: Standardizer | None) -> np.ndarray:
    """Standardised model outputs or targets back in the data's units."""
    return targets.invert(values) if targets is not None else values


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    task: str,
    device: torch.device,
    batch_size: int,
    targets: Standardizer | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """Loss and task metrics of ``model`` on (x, y); keys without a split prefix."""
    if task in GENERATIVE_TASKS:
        return _evaluate_generator(model, x, y, task=task, device=device, batch_size=batch_size, bf16=bf16)
    was_training = model.training
    model.eval()
    total, outputs = 0.0, []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device, non_blocking=True)
        yb = y[start:start + batch_size].to(device, non_blocking=True)
        with autocast_for(device, bf16):
            out = model(xb)
        total += float(loss_sum(task, out, yb))
        outputs.append(out.float().cpu())
    model.train(was_training)
    predicted = torch.cat(outputs).numpy().astype(np.float64)
    truth = y.numpy()
    metrics = {"loss": total / max(len(x), 1)}
    if task in CLASSIFYING:
        labels = predicted.argmax(axis=1)
        metrics["accuracy"] = float(np.mean(labels == truth))
        metrics["f1"] = macro_f1(truth, labels)
        return metrics
    predicted = predicted.reshape(len(truth), -1)
    truth = truth.astype(np.float64).reshape(len(truth), -1)
    metrics.update(regression_metrics(original_units(truth, targets), original_units(predicted, targets)))
    if task == FORECASTING:
        # The naive forecast repeats the last observed value; a model must beat it to be useful.
        last = x[:, -1, 0].numpy().astype(np.float64)[:, None].repeat(truth.shape[1], axis=1)
        metrics["naive_rmse"] = float(root_mean_squared_error(
            np.ravel(original_units(truth, targets)), np.ravel(original_units(last, targets))))
    return metrics


@torch.no_grad()
def _evaluate_generator(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, task: str, device: torch.device,
                        batch_size: int, bf16: bool) -> dict[str, float]:
    """Per-token loss and perplexity (exp of the loss); seq2seq adds the greedy exact-match rate."""
    was_training = model.training
    model.eval()
    total, matches = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device, non_blocking=True)
        yb = y[start:start + batch_size].to(device, non_blocking=True)
        with autocast_for(device, bf16):
            total += float(loss_sum(task, model(xb), yb))
        if task == SEQUENCE_TO_SEQUENCE:
            from worker.ml.generation import greedy_targets

            matches += int(greedy_targets(model, xb[:, :model.source_tokens]).eq(yb).all(dim=1).sum())
    model.train(was_training)
    loss = total / max(len(x), 1)
    metrics = {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0)))}
    if task == SEQUENCE_TO_SEQUENCE:
        metrics["exact_match"] = matches / max(len(x), 1)
    return metrics
