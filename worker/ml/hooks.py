"""The callbacks through which a training run talks to the outside world (no torch here)."""

from __future__ import annotations

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
        data: bytes,
        *,
        metric_name: str | None,
        metric_value: float | None,
        is_best: bool,
        reason: str,
    ) -> None:
        """Persist a checkpoint (safetensors bytes); reason is "periodic" or a stop reason."""

    def stop_reason(self) -> str | None:
        """Why the run must stop now ("cancel", "pause", "shutdown", "timeout"), or None. Cheap."""
