"""Optimizers and learning-rate schedules from the spec's hyperparameters.

Schedules advance once per optimizer step, so epoch-based settings (``step_size``,
``warmup_epochs``) are converted to steps; a resumed run restores them from their state_dict.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import lr_scheduler

from app.jobs.schemas import Hyperparameters


def build_optimizer(hp: Hyperparameters, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum, Adam or AdamW over the model's parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach=False keeps one code path (and one set of numerics) on every device.
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.learning_rate, momentum=hp.momentum,
                               weight_decay=hp.weight_decay, foreach=False)
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, foreach=False)
    return torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, foreach=False)


def steps_per_epoch(num_batches: int, grad_accum_steps: int) -> int:
    """Optimizer steps in one epoch (a last, short accumulation group still steps)."""
    return -(-num_batches // grad_accum_steps)


def build_scheduler(
    hp: Hyperparameters, optimizer: torch.optim.Optimizer, epoch_steps: int
) -> lr_scheduler.LRScheduler | None:
    """The spec's schedule with its linear warm-up, stepped per optimizer step; None for a flat rate."""
    total = max(hp.epochs * epoch_steps, 1)
    warmup = min(hp.warmup_epochs * epoch_steps + hp.warmup_steps, total - 1)
    if hp.scheduler == "onecycle":
        # One-cycle has its own warm-up; warmup_epochs sets its length (default 30% of the run).
        pct_start = warmup / total if warmup > 0 else 0.3
        return lr_scheduler.OneCycleLR(optimizer, max_lr=hp.learning_rate, total_steps=total,
                                       pct_start=max(pct_start, 1.0 / total),
                                       # Plain SGD has no momentum to cycle.
                                       cycle_momentum=not (hp.optimizer == "sgd" and hp.momentum == 0))
    after = total - warmup
    if hp.scheduler == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=max(hp.step_size * epoch_steps, 1), gamma=hp.gamma)
    elif hp.scheduler == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(after, 1))
    elif hp.scheduler == "linear":
        # Linear decay to zero over the steps after warm-up (the usual fine-tuning schedule).
        main = lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=max(after, 1))
    else:
        main = None
    if warmup <= 0:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    if main is None:
        return ramp
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the first parameter group."""
    lr = optimizer.param_groups[0]["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)
