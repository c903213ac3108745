"""The callbacks through which a training run talks to the outside world (no torch here)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class TrainingHooks(Protocol):
    """What the training loop calls; the runner's recorder implements it."""

    def on_metrics(self, scope: str, epoch: int, step: int, values: dict[str, float]) -> None:
        """Record metrics; scope is "step", "epoch" or "test"."""

    def on_progress(self, epoch: int, step: int, fraction: float) -> None:
        """Report progress (0..1) after each epoch and every ``log_every_steps``."""

    def on_checkpoint(
        self,
        epoch: int,
        step: int,
        data: Iterable[bytes | memoryview],
        *,
        metric_name: str | None,
        metric_value: float | None,
        is_best: bool,
        reason: str,
    ) -> None:
        """Persist a checkpoint; reason is "periodic" or a stop reason.

        ``data`` is the safetensors file as chunks (a ``worker.ml.checkpoints.Encoded``: iterate it,
        or take ``bytes(data)``); it holds its own copies, so it can be written after training went on.
        """

    def stop_reason(self) -> str | None:
        """Why the run must stop now ("cancel", "pause", "shutdown", "timeout"), or None. Cheap."""
