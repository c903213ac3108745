"""Fixtures for the PyTorch engine: an in-memory hooks recorder and a spec builder."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from app.jobs.schemas import TrainSpec, parse_spec


@dataclass
class RecordedCheckpoint:
    """One call to ``on_checkpoint``."""

    epoch: int
    step: int
    data: bytes
    metric_name: str | None
    metric_value: float | None
    is_best: bool
    reason: str


@dataclass
class FakeHooks:
    """Records every callback; asks the run to stop before optimizer step ``stop_at_step``."""

    stop_at_step: int | None = None
    stop_reason_value: str = "pause"
    metrics: list[tuple[str, int, int, dict]] = field(default_factory=list)
    progress: list[tuple[int, int, float]] = field(default_factory=list)
    checkpoints: list[RecordedCheckpoint] = field(default_factory=list)
    stop_checks: int = 0

    def on_metrics(self, scope: str, epoch: int, step: int, values: dict[str, float]) -> None:
        self.metrics.append((scope, epoch, step, dict(values)))

    def on_progress(self, epoch: int, step: int, fraction: float) -> None:
        self.progress.append((epoch, step, fraction))

    def on_checkpoint(self, epoch, step, data, *, metric_name, metric_value, is_best, reason) -> None:
        # The loop hands over the checkpoint laid out in chunks (``checkpoints.Encoded``): keep its bytes.
        self.checkpoints.append(RecordedCheckpoint(epoch, step, bytes(data), metric_name, metric_value, is_best,
                                                   reason))

    def stop_reason(self) -> str | None:
        # Called before each optimizer step; the number of calls so far is the step about to run.
        step = self.stop_checks
        self.stop_checks += 1
        if self.stop_at_step is not None and step == self.stop_at_step:
            return self.stop_reason_value
        return None

    def scope(self, scope: str) -> list[tuple[int, int, dict]]:
        """(epoch, step, values) of every metrics call in ``scope``."""
        return [(e, s, v) for sc, e, s, v in self.metrics if sc == scope]


def make_spec(arch: str = "mlp", dataset: str = "builtin:iris", *, model: dict | None = None,
              data: dict | None = None, checkpoint: dict | None = None, device: str = "cpu",
              **hyperparameters) -> TrainSpec:
    """A validated TrainSpec with small, fast defaults; extra keywords are hyperparameters."""
    payload = {
        "kind": "train",
        "name": "test-job",
        "model": {"arch": arch, **(model or {})},
        "dataset": {"id": dataset, **(data or {})},
        "hyperparameters": {"epochs": 2, "batch_size": 32, **hyperparameters},
        "resources": {"device": device},
        "checkpoint": checkpoint or {},
    }
    spec = parse_spec(payload)
    assert isinstance(spec, TrainSpec)
    return spec


# Fixtures rather than imports, so the helpers work whatever pytest import mode the repo uses.
@pytest.fixture(scope="session")
def fake_hooks() -> type[FakeHooks]:
    """The FakeHooks class, to build recorders with a stop step."""
    return FakeHooks


@pytest.fixture(scope="session")
def spec_for():
    """The make_spec builder."""
    return make_spec


@pytest.fixture
def hooks() -> FakeHooks:
    """A fresh recorder that never asks to stop."""
    return FakeHooks()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run each module on one intra-op thread, as a runner on a shared CPU would configure it.

    The test models are tiny: a second thread buys nothing and, on a busy 2-core machine,
    makes timings swing several-fold through thread contention.
    """
    import torch

    from worker.ml import configure_threads

    before = torch.get_num_threads()
    configure_threads(1)
    yield
    torch.set_num_threads(before)
