"""CUDA paths: bf16 training, memory metrics, CPU serving of GPU checkpoints, and OOM advice."""

from __future__ import annotations

import pytest
import torch

from app.jobs.errors import OutOfMemory
from worker.ml.datasets import load_builtin_raw
from worker.ml.prediction import predict
from worker.ml.training import train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_trains_on_cuda_in_bf16_and_reports_memory(fake_hooks, spec_for):
    hooks = fake_hooks()
    spec = spec_for("lstm", "builtin:digits", model={"hidden_size": 64}, device="auto", epochs=8, batch_size=64,
                    learning_rate=0.005)
    result = train(spec, hooks=hooks)
    epoch_metrics = hooks.scope("epoch")[-1][2]
    assert epoch_metrics["cuda_peak_mem_mb"] > 0
    assert result.test_metrics["test_accuracy"] >= 0.9
    x, _ = load_builtin_raw("digits")
    answer = predict(hooks.checkpoints[-1].data, [x[0].tolist()], device="cpu")
    assert len(answer["predictions"][0]["probabilities"]) == 10
    on_gpu = predict(hooks.checkpoints[-1].data, [x[0].tolist()], device="cuda")
    assert on_gpu["predictions"][0]["index"] == answer["predictions"][0]["index"]


def test_stop_and_resume_on_cuda(fake_hooks, spec_for):
    spec = spec_for("transformer", "builtin:digits", device="cuda", epochs=2, batch_size=64,
                    model={"d_model": 32, "nhead": 4, "num_layers": 1, "dropout": 0.1})
    stopped = fake_hooks(stop_at_step=25)
    assert train(spec, hooks=stopped).stopped == "pause"
    resumed = train(spec, hooks=fake_hooks(), resume=stopped.checkpoints[-1].data)
    assert resumed.epochs_completed == 2 and resumed.resumed_from_epoch == 1
    assert resumed.test_metrics["test_accuracy"] > 0.5


def test_out_of_memory_becomes_advice(fake_hooks, spec_for):
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(0.0005)
    try:
        spec = spec_for("mlp", "builtin:digits", model={"hidden_sizes": [8192, 8192]}, device="cuda",
                        batch_size=1024, epochs=1)
        with pytest.raises(OutOfMemory, match="batch_size"):
            train(spec, hooks=fake_hooks())
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_device_memory_is_released_after_the_job(fake_hooks, spec_for):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    spec = spec_for("transformer", "builtin:digits", device="cuda", epochs=1, batch_size=64,
                    model={"d_model": 64, "nhead": 4, "num_layers": 2})
    train(spec, hooks=fake_hooks())
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert torch.cuda.memory_reserved() <= before + 2 * 2**20  # the cache was emptied, not kept for later


def test_training_data_is_staged_on_the_gpu_once_and_trains_as_streamed_batches_do(fake_hooks, spec_for,
                                                                                    monkeypatch):
    from worker.ml import devices, training

    x, y = torch.zeros(100, 8), torch.zeros(100, dtype=torch.long)
    staged_x, staged_y = devices.stage(x, y, device=torch.device("cuda"))
    assert staged_x.is_cuda and staged_y.is_cuda
    spec = spec_for("mlp", "builtin:digits", device="cuda", epochs=2, batch_size=64)
    staged = train(spec, hooks=fake_hooks())
    monkeypatch.setattr(training, "stage", lambda x, y, *, device: (x, y))  # every batch copied from the host
    streamed = train(spec, hooks=fake_hooks())
    assert staged.final_metrics["train_loss"] == pytest.approx(streamed.final_metrics["train_loss"], rel=1e-6)
    assert staged.test_metrics["test_accuracy"] == pytest.approx(streamed.test_metrics["test_accuracy"], abs=0.01)
