"""The training loop: reports, determinism, stop and resume, checkpoints, early stopping, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_tensors

from app.jobs.errors import UserError
from worker.ml.training import train

TIMING = ("samples_per_sec", "epoch_time_s")


def weights(data: bytes) -> dict[str, torch.Tensor]:
    """The model weights inside checkpoint bytes."""
    return {k: v for k, v in load_tensors(data).items() if k.startswith("model.")}


def reproducible(metrics: dict) -> dict:
    """Metrics without wall-clock measurements."""
    return {k: v for k, v in metrics.items() if k not in TIMING}


def test_reports_epoch_step_test_metrics_and_progress(spec_for, hooks):
    result = train(spec_for(epochs=3, batch_size=16, log_every_steps=3), hooks=hooks)
    epochs = hooks.scope("epoch")
    assert [e for e, _, _ in epochs] == [1, 2, 3]
    assert set(epochs[0][2]) == {"train_loss", "val_loss", "lr", "samples_per_sec", "epoch_time_s",
                                 "val_accuracy", "val_f1"}
    steps_per_epoch = math.ceil(result.signature["rows"]["train"] / 16)
    assert [s for _, s, _ in epochs] == [steps_per_epoch * k for k in (1, 2, 3)]
    step_metrics = hooks.scope("step")
    assert [s for _, s, _ in step_metrics] == list(range(3, result.steps + 1, 3))
    assert all(set(v) == {"train_loss", "lr"} for _, _, v in step_metrics)
    assert step_metrics[0][0] == 1  # reported inside the first epoch
    fractions = [f for _, _, f in hooks.progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert set(result.test_metrics) == {"test_loss", "test_accuracy", "test_f1"}
    assert result.epochs_completed == 3 and result.stopped is None and result.resumed_from_epoch is None
    assert result.best_metric_name == "val_loss"
    assert result.best_metric_value == min(v["val_loss"] for _, _, v in epochs)


def test_regression_and_forecasting_report_error_metrics(spec_for, hooks):
    train(spec_for(dataset="builtin:diabetes", epochs=1), hooks=hooks)
    assert {"val_rmse", "val_mae", "val_r2"} <= set(hooks.scope("epoch")[0][2])
    result = train(spec_for("gru", "builtin:sine", model={"hidden_size": 8}, epochs=1, data={"horizon": 3}),
                   hooks=hooks)
    assert {"test_rmse", "test_mae", "test_r2", "test_naive_rmse"} <= set(result.test_metrics)


def test_same_spec_and_seed_give_identical_metrics(spec_for, fake_hooks):
    spec = spec_for(model={"hidden_sizes": [32], "dropout": 0.3}, epochs=3, batch_size=16)
    a, b = fake_hooks(), fake_hooks()
    ra, rb = train(spec, hooks=a), train(spec, hooks=b)
    assert [reproducible(v) for _, _, v in a.scope("epoch")] == [reproducible(v) for _, _, v in b.scope("epoch")]
    assert ra.test_metrics == rb.test_metrics
    other = train(spec_for(model={"hidden_sizes": [32], "dropout": 0.3}, epochs=3, batch_size=16, seed=7),
                  hooks=fake_hooks())
    assert other.final_metrics["train_loss"] != ra.final_metrics["train_loss"]


RESUME_CASES = {
    # name: (arch, model, hyperparameters, stop before optimizer step)
    "mlp-dropout-cosine-mid-epoch": ("mlp", {"hidden_sizes": [32], "dropout": 0.3},
                                     {"scheduler": "cosine", "warmup_epochs": 1}, 10),
    "lstm-onecycle-accumulation": ("lstm", {"hidden_size": 8, "num_layers": 2, "dropout": 0.2},
                                   {"scheduler": "onecycle", "grad_accum_steps": 2, "grad_clip": 1.0}, 5),
    "transformer-step-at-epoch-boundary": ("transformer", {"d_model": 8, "nhead": 2, "num_layers": 1,
                                                           "dim_feedforward": 16, "dropout": 0.2},
                                           {"scheduler": "step", "step_size": 1, "optimizer": "sgd"}, 14),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_stop_then_resume_matches_an_uninterrupted_run(case, spec_for, fake_hooks):
    arch, model, hyperparameters, stop_at = RESUME_CASES[case]
    spec = spec_for(arch, model=model, epochs=4, batch_size=16, **hyperparameters)
    straight_hooks = fake_hooks()
    straight = train(spec, hooks=straight_hooks)

    stopped_hooks = fake_hooks(stop_at_step=stop_at, stop_reason_value="shutdown")
    stopped = train(spec, hooks=stopped_hooks)
    assert stopped.stopped == "shutdown" and stopped.steps == stop_at and stopped.test_metrics == {}
    saved = stopped_hooks.checkpoints[-1]
    assert saved.reason == "shutdown" and saved.step == stop_at

    resumed_hooks = fake_hooks()
    resumed = train(spec, hooks=resumed_hooks, resume=saved.data)
    assert resumed.stopped is None and resumed.resumed_from_epoch == stopped.epochs_completed
    assert resumed.steps == straight.steps
    assert reproducible(resumed.final_metrics) == pytest.approx(reproducible(straight.final_metrics), abs=1e-6)
    assert resumed.test_metrics == pytest.approx(straight.test_metrics, abs=1e-6)
    final_a, final_b = weights(straight_hooks.checkpoints[-1].data), weights(resumed_hooks.checkpoints[-1].data)
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        torch.testing.assert_close(final_a[name], final_b[name], atol=1e-6, rtol=0)
    # Epochs before the stop are not repeated; the ones after match the uninterrupted run.
    straight_epochs = {e: reproducible(v) for e, _, v in straight_hooks.scope("epoch")}
    for epoch, _, values in resumed_hooks.scope("epoch"):
        assert epoch > stopped.epochs_completed
        assert reproducible(values) == pytest.approx(straight_epochs[epoch], abs=1e-6)


def test_resuming_a_finished_run_only_reports_the_test(spec_for, fake_hooks):
    spec = spec_for(epochs=2)
    first = fake_hooks()
    done = train(spec, hooks=first)
    again = fake_hooks()
    result = train(spec, hooks=again, resume=first.checkpoints[-1].data)
    assert again.scope("epoch") == [] and result.steps == done.steps
    assert result.test_metrics == pytest.approx(done.test_metrics)


def test_resume_from_another_model_is_refused(spec_for, fake_hooks):
    other = fake_hooks()
    train(spec_for("gru", model={"hidden_size": 4}, epochs=1), hooks=other)
    with pytest.raises(UserError, match="does not match"):
        train(spec_for(epochs=1), hooks=fake_hooks(), resume=other.checkpoints[-1].data)


def test_checkpoints_follow_the_policy_and_flag_the_best(spec_for, hooks):
    result = train(spec_for(epochs=5, checkpoint={"every_epochs": 2}), hooks=hooks)
    assert [c.epoch for c in hooks.checkpoints] == [2, 4, 5]
    assert all(c.reason == "periodic" and c.metric_name == "val_loss" for c in hooks.checkpoints)
    val_losses = {e: v["val_loss"] for e, _, v in hooks.scope("epoch")}
    best_so_far = math.inf
    expected = {}
    for epoch in sorted(val_losses):
        expected[epoch] = val_losses[epoch] < best_so_far
        best_so_far = min(best_so_far, val_losses[epoch])
    assert [c.is_best for c in hooks.checkpoints] == [expected[c.epoch] for c in hooks.checkpoints]
    assert [c.metric_value for c in hooks.checkpoints] == [val_losses[c.epoch] for c in hooks.checkpoints]
    assert result.best_epoch == min(val_losses, key=val_losses.get)


def test_early_stopping_stops_and_tests_the_best_weights(spec_for, hooks):
    # A min_delta no epoch can beat: only epoch 1 counts as an improvement.
    spec = spec_for(epochs=30, early_stopping={"metric": "val_loss", "patience": 2, "min_delta": 100.0})
    result = train(spec, hooks=hooks)
    assert result.epochs_completed == 3 and result.best_epoch == 1
    assert hooks.checkpoints[-1].epoch == 3
    assert hooks.progress[-1][2] == 1.0


def test_early_stopping_on_accuracy_maximises(spec_for, hooks):
    result = train(spec_for(epochs=6, early_stopping={"metric": "val_accuracy", "patience": 10}), hooks=hooks)
    accuracies = [v["val_accuracy"] for _, _, v in hooks.scope("epoch")]
    assert result.best_metric_name == "val_accuracy" and result.best_metric_value == max(accuracies)
    assert hooks.checkpoints[-1].metric_name == "val_accuracy"


def test_early_stopping_on_an_unknown_metric_is_a_user_error(spec_for, hooks):
    with pytest.raises(UserError, match="val_rmse"):
        train(spec_for(early_stopping={"metric": "val_rmse"}), hooks=hooks)


def test_gradient_accumulation_equals_a_larger_batch(spec_for, fake_hooks):
    small = fake_hooks()
    big = fake_hooks()
    a = train(spec_for(epochs=2, batch_size=16, grad_accum_steps=2, optimizer="sgd", learning_rate=0.05), hooks=small)
    b = train(spec_for(epochs=2, batch_size=32, optimizer="sgd", learning_rate=0.05), hooks=big)
    assert a.steps == b.steps
    assert a.final_metrics["val_loss"] == pytest.approx(b.final_metrics["val_loss"], abs=1e-5)
    wa, wb = weights(small.checkpoints[-1].data), weights(big.checkpoints[-1].data)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-5)


def _step_lrs(spec_for, fake_hooks, **hyperparameters) -> tuple[list[float], int]:
    hooks = fake_hooks()
    result = train(spec_for(epochs=4, batch_size=16, learning_rate=0.1, log_every_steps=1, **hyperparameters),
                   hooks=hooks)
    return [v["lr"] for _, _, v in hooks.scope("step")], result.steps // 4


def test_each_scheduler_shapes_the_learning_rate(spec_for, fake_hooks):
    flat, per_epoch = _step_lrs(spec_for, fake_hooks, scheduler="none")
    assert set(flat) == {0.1}
    warm, _ = _step_lrs(spec_for, fake_hooks, scheduler="none", warmup_epochs=1)
    assert warm[0] < 0.02 and warm[:per_epoch] == sorted(warm[:per_epoch]) and warm[-1] == pytest.approx(0.1)
    step, _ = _step_lrs(spec_for, fake_hooks, scheduler="step", step_size=1, gamma=0.5)
    assert [step[e * per_epoch] for e in range(4)] == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    cosine, _ = _step_lrs(spec_for, fake_hooks, scheduler="cosine")
    assert cosine == sorted(cosine, reverse=True) and cosine[-1] < 0.01
    onecycle, _ = _step_lrs(spec_for, fake_hooks, scheduler="onecycle")
    peak = int(np.argmax(onecycle))
    assert 0 < peak < len(onecycle) - 1 and max(onecycle) == pytest.approx(0.1, rel=0.05)
    assert onecycle[0] < 0.01 and onecycle[-1] < 0.001


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_each_optimizer_learns(spec_for, hooks, optimizer):
    result = train(spec_for(epochs=5, optimizer=optimizer, learning_rate=0.05 if optimizer == "sgd" else 0.01,
                            weight_decay=0.01), hooks=hooks)
    first = hooks.scope("epoch")[0][2]["train_loss"]
    assert result.final_metrics["train_loss"] < first


def test_init_from_fine_tunes_and_refuses_other_shapes(spec_for, fake_hooks):
    base = fake_hooks()
    train(spec_for(epochs=8, learning_rate=0.01), hooks=base)
    scratch, tuned = fake_hooks(), fake_hooks()
    train(spec_for(epochs=1, learning_rate=0.001), hooks=scratch)
    train(spec_for(epochs=1, learning_rate=0.001), hooks=tuned, init_from=base.checkpoints[-1].data)
    assert tuned.scope("epoch")[0][2]["val_loss"] < scratch.scope("epoch")[0][2]["val_loss"]
    with pytest.raises(UserError, match="does not fit this model"):
        train(spec_for(dataset="builtin:wine", epochs=1), hooks=fake_hooks(), init_from=base.checkpoints[-1].data)


def test_no_validation_split_monitors_train_loss(spec_for, hooks):
    result = train(spec_for(epochs=2, data={"split": {"val_fraction": 0.0, "test_fraction": 0.0}}), hooks=hooks)
    assert result.best_metric_name == "train_loss" and result.test_metrics == {}
    assert "val_loss" not in result.final_metrics


def test_mixed_precision_loop_trains(spec_for, hooks, monkeypatch):
    # The bf16 path CUDA takes, run with CPU autocast so it is covered on machines without a GPU.
    monkeypatch.setattr("worker.ml.training.uses_bf16", lambda device, precision: True)
    result = train(spec_for("lstm", "builtin:digits", model={"hidden_size": 32}, epochs=3, batch_size=64,
                            learning_rate=0.01), hooks=hooks)
    assert result.final_metrics["val_accuracy"] > 0.8
