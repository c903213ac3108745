"""Losses and evaluation: the task's loss for training, and metrics in the data's own units."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from worker.ml.devices import autocast_for
from worker.ml.preparation import FORECASTING, REGRESSION, Standardizer

CLASSIFYING = ("classification", "text_classification")


def loss_sum(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed loss of a batch (cross-entropy, or squared error on standardised targets)."""
    outputs = outputs.float()
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
    task_metrics = ("accuracy", "f1") if task in CLASSIFYING else ("rmse", "mae", "r2")
    return ["train_loss", "val_loss", *(f"val_{name}" for name in task_metrics)]


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Unweighted mean F1 over the classes that occur in truth or prediction (as scikit-learn)."""
    scores = []
    for label in np.union1d(truth, predicted):
        tp = np.sum((predicted == label) & (truth == label))
        fp = np.sum((predicted == label) & (truth != label))
        fn = np.sum((predicted != label) & (truth == label))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def regression_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """RMSE, MAE and R² of values in original units."""
    error = predicted - truth
    spread = np.sum((truth - truth.mean()) ** 2)
    r2 = 1.0 - float(np.sum(error**2) / spread) if spread > 0 else 0.0
    return {"rmse": float(np.sqrt(np.mean(error**2))), "mae": float(np.mean(np.abs(error))), "r2": r2}


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
        naive = original_units(last, targets) - original_units(truth, targets)
        metrics["naive_rmse"] = float(np.sqrt(np.mean(naive**2)))
    return metrics
