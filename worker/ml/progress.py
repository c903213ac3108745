"""Where a run stands (epoch, step, position, best metric) and how that state is saved and restored.

A checkpoint taken here lets a run continue on exactly the same trajectory: the position inside
the epoch, the summed epoch loss so far, the optimizer and schedule, and the RNG that drives
dropout all come back; the shuffle order is a pure function of (seed, epoch).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from app.jobs.errors import UserError
from app.jobs.schemas import TrainSpec
from worker.ml.checkpoints import Checkpoint

_MAXIMISED = ("accuracy", "f1", "r2")


@dataclass
class Progress:
    """Everything but tensors that a resumed run needs to carry on exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    position: int = 0  # micro-batches done in the epoch under way
    loss_sum: float = 0.0  # summed training loss of the epoch under way
    samples: int = 0  # training samples of the epoch under way
    best_value: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    finished: bool = False
    last_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def reported_epoch(self) -> int:
        """The 1-based epoch to report: the one under way, or the last finished at a boundary."""
        return self.epoch + (1 if self.position > 0 else 0)

    @classmethod
    def from_dict(cls, saved: dict) -> "Progress":
        """Progress from a checkpoint's ``training`` metadata (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    def to_dict(self) -> dict:
        """JSON-able progress for a checkpoint."""
        return asdict(self)


@dataclass(frozen=True)
class Monitor:
    """The validation metric that picks the best checkpoint and drives early stopping."""

    name: str
    mode: str  # "min" | "max"
    min_delta: float = 0.0

    @classmethod
    def for_spec(cls, spec: TrainSpec, available: list[str]) -> "Monitor":
        """``early_stopping.metric`` if set, else val_loss (train_loss when there is no validation)."""
        stopping = spec.hyperparameters.early_stopping
        name = stopping.metric if stopping else ("val_loss" if "val_loss" in available else "train_loss")
        if name not in available:
            raise UserError(f"early_stopping.metric {name!r} is not reported for this job; "
                            f"choose one of {', '.join(available)}")
        mode = stopping.mode if stopping and stopping.mode else None
        if mode is None:
            mode = "max" if any(name.endswith(suffix) for suffix in _MAXIMISED) else "min"
        return cls(name, mode, stopping.min_delta if stopping else 0.0)

    def improves(self, value: float, best: float | None, *, margin: float = 0.0) -> bool:
        """Whether ``value`` beats ``best`` by more than ``min_delta`` (and ``margin`` on top)."""
        if value is None or math.isnan(value):
            return False
        if best is None:
            return True
        by = self.min_delta + margin
        return value < best - by if self.mode == "min" else value > best + by


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle order of epoch ``epoch`` (0-based): a function of (seed, epoch) only."""
    generator_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
    return torch.randperm(n, generator=torch.Generator().manual_seed(generator_seed))


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global generator states that dropout draws from (CPU, and CUDA when training there)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda.{index}"] = cuda_state
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put back generator states saved by :func:`rng_state`."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        for key, cuda_state in state.items():
            if key.startswith("cuda.") and int(key[5:]) < torch.cuda.device_count():
                torch.cuda.set_rng_state(cuda_state, int(key[5:]))


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load weights that must match the model's names and shapes exactly, else a UserError."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise UserError(f"the {source} checkpoint does not fit this model: "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"the {source} checkpoint does not fit this model: {name} has shape "
                            f"{list(tensor.shape)}, this model needs {list(expected[name].shape)}")
    model.load_state_dict(weights)


def check_resumable(saved: Checkpoint, signature: dict) -> None:
    """Refuse to resume from a checkpoint of a different model or data layout."""
    for key in ("arch", "task", "input_shape", "num_outputs", "classes"):
        if saved.signature.get(key) != signature.get(key):
            raise UserError(f"the checkpoint to resume from does not match this job ({key}: "
                            f"{saved.signature.get(key)!r} there, {signature.get(key)!r} here)")
