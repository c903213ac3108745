"""Checkpoints are plain safetensors files that round-trip every part of a run's state."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from app.jobs.errors import UserError
from worker.ml import checkpoints
from worker.ml.datasets import load_builtin_raw, split_indices
from worker.ml.prediction import clear_cache, predict, signature
from worker.ml.training import train


@pytest.fixture(scope="module")
def stopped_run(fake_hooks, spec_for):
    """A run with dropout, a schedule and a tokenizer-free tabular task, stopped mid-epoch 2."""
    hooks = fake_hooks(stop_at_step=9, stop_reason_value="cancel")
    spec = spec_for(model={"dropout": 0.2}, epochs=3, batch_size=16, scheduler="cosine", warmup_epochs=1)
    train(spec, hooks=hooks)
    return spec, hooks


def test_checkpoint_is_pure_safetensors(stopped_run, tmp_path):
    _, hooks = stopped_run
    data = hooks.checkpoints[-1].data
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        metadata = f.metadata()
    assert all(n.split(".")[0] in {"model", "best_model", "optimizer", "rng", "normalizer"} for n in names)
    assert metadata["format"] == "kiln-checkpoint/1"
    # Every metadata value is JSON text: nothing in the file needs unpickling.
    for key in ("signature", "spec", "training", "optimizer", "scheduler"):
        json.loads(metadata[key])
    weights_only = {k: v for k, v in load_tensors(data).items() if k.startswith("model.")}
    assert weights_only and all(isinstance(v, torch.Tensor) for v in weights_only.values())


def test_round_trip_keeps_every_part(stopped_run):
    spec, hooks = stopped_run
    saved = hooks.checkpoints[-1]
    decoded = checkpoints.decode(saved.data)
    assert saved.reason == "cancel" and saved.epoch == 2 and saved.step == 9
    assert decoded.training["epoch"] == 1 and decoded.training["step"] == 9
    assert decoded.training["position"] == 2  # 7 batches per epoch: 2 done in the second
    assert decoded.spec == spec.model_dump(mode="json")
    assert decoded.signature["task"] == "classification" and decoded.signature["arch"] == "mlp"
    assert decoded.scheduler is not None and decoded.optimizer["state"]
    assert set(decoded.normalizer) == {"features.mean", "features.std"}
    assert decoded.best_model is not None  # the best epoch's weights differ from the current ones
    assert decoded.rng["torch"].dtype == torch.uint8
    again = checkpoints.decode(checkpoints.encode(decoded))
    for name, tensor in decoded.model.items():
        assert torch.equal(tensor, again.model[name])
    for index, state in decoded.optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(value, again.optimizer["state"][index][key]) if isinstance(value, torch.Tensor) \
                else value == again.optimizer["state"][index][key]
    assert again.optimizer["param_groups"] == decoded.optimizer["param_groups"]
    assert again.training == decoded.training and again.scheduler == decoded.scheduler


def test_signature_is_readable_without_loading_tensors(stopped_run):
    _, hooks = stopped_run
    sig = signature(hooks.checkpoints[-1].data)
    assert sig["input_shape"] == [4] and sig["classes"] == ["setosa", "versicolor", "virginica"]
    assert sig["feature_names"][0] == "sepal length (cm)" and sig["dataset"] == "builtin:iris"


def test_text_checkpoint_carries_the_vocabulary(tmp_path, fake_hooks, spec_for):
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "\n".join(f"good {i} day,pos\nbad {i} night,neg" for i in range(10)) + "\n")
    hooks = fake_hooks()
    train(spec_for("gru", "dataset:2", model={"hidden_size": 4}, epochs=1, data={"text_column": "text"}),
          hooks=hooks, dataset_file=path, dataset_format="csv")
    decoded = checkpoints.decode(hooks.checkpoints[-1].data)
    assert decoded.vocabulary[:2] == ["<pad>", "<unk>"] and "good" in decoded.vocabulary


def test_foreign_bytes_are_refused():
    with pytest.raises(UserError, match="not a safetensors file"):
        signature(b"\x80\x04\x95 definitely a pickle")
    plain = save_tensors({"w": torch.zeros(2)})
    with pytest.raises(UserError, match="not a Kiln checkpoint"):
        checkpoints.decode(plain)


def test_check_accepts_a_whole_checkpoint_and_refuses_a_cut_or_damaged_one(stopped_run):
    data = stopped_run[1].checkpoints[-1].data
    checkpoints.check(data)
    for torn in (data[: len(data) - 1], data[: len(data) // 2], data[:7]):
        with pytest.raises(checkpoints.UnreadableCheckpoint):
            checkpoints.check(torn)
    # A header whose JSON metadata was damaged in place (same length) is refused too.
    damaged = data.replace(b'"signature":"{', b'"signature":"[', 1)
    assert damaged != data
    with pytest.raises(checkpoints.UnreadableCheckpoint, match="signature"):
        checkpoints.check(damaged)
    assert issubclass(checkpoints.UnreadableCheckpoint, UserError)


def test_tied_weights_are_stored_once_each_and_read_back_equal():
    # A causal LM ties its output layer to the token embedding: two names, one storage.
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    data = checkpoints.encode(checkpoints.Checkpoint(
        model={"embed.weight": embedding.weight, "head.weight": head.weight}, signature={}, spec={}))
    decoded = checkpoints.decode(data)
    assert torch.equal(decoded.model["embed.weight"], embedding.weight.detach())
    assert torch.equal(decoded.model["head.weight"], embedding.weight.detach())


def test_a_finished_runs_last_checkpoint_drops_the_optimizer_and_a_resume_from_it_only_evaluates(
        spec_for, fake_hooks):
    spec = spec_for(model={"dropout": 0.2}, epochs=2, batch_size=16, scheduler="cosine")
    hooks = fake_hooks()
    done = train(spec, hooks=hooks)
    first, last = (checkpoints.decode(c.data) for c in hooks.checkpoints)
    assert first.optimizer is not None and first.scheduler is not None  # training went on from it
    assert last.training["finished"] and last.optimizer is None and last.scheduler is None
    assert len(hooks.checkpoints[-1].data) < len(hooks.checkpoints[0].data) / 2
    again = fake_hooks()
    resumed = train(spec, hooks=again, resume=hooks.checkpoints[-1].data)
    assert resumed.steps == done.steps and again.stop_checks == 0  # no step was trained
    assert resumed.test_metrics == done.test_metrics


def test_a_model_whose_best_epoch_was_not_checkpointed_serves_the_best_weights(spec_for, fake_hooks):
    # Checkpoints every 2 epochs of 3, and the best epoch is the first (the highest train loss is
    # "best" here on purpose): the job's model version is served from the last checkpoint, which
    # must serve the weights the test metrics were computed with, not the ones training ended with.
    spec = spec_for(model={"hidden_sizes": [16]}, epochs=3, batch_size=16, learning_rate=0.05,
                    checkpoint={"every_epochs": 2},
                    early_stopping={"metric": "train_loss", "mode": "max", "patience": 100})
    hooks = fake_hooks()
    result = train(spec, hooks=hooks)
    assert result.best_epoch == 1 and [c.epoch for c in hooks.checkpoints] == [2, 3]
    assert not any(c.is_best for c in hooks.checkpoints)
    last = hooks.checkpoints[-1].data
    features, labels = load_builtin_raw("iris")
    _, _, test = split_indices(len(labels), spec.dataset.split)

    def test_loss(checkpoint: bytes) -> float:
        clear_cache()
        out = predict(checkpoint, features[test].tolist())
        chosen = [p["probabilities"][int(y)] for p, y in zip(out["predictions"], labels[test])]
        return float(-np.mean(np.log(chosen)))

    assert test_loss(last) == pytest.approx(result.test_metrics["test_loss"], abs=1e-5)
    # The weights training ended with give another loss: the check above can tell them apart.
    decoded = checkpoints.decode(last)
    ended_with = checkpoints.encode(checkpoints.Checkpoint(
        model=decoded.model, signature=decoded.signature, spec=decoded.spec, normalizer=decoded.normalizer))
    assert abs(test_loss(ended_with) - result.test_metrics["test_loss"]) > 1e-3


def test_the_layout_is_safetensors_with_every_tensor_aligned_and_the_header_padded():
    tensors = {"a": torch.arange(3, dtype=torch.float64), "b": torch.ones(2, 3, dtype=torch.bfloat16),
               "c": torch.tensor([True, False, True]), "d": torch.tensor(7.5), "e": torch.zeros(0),
               "f": torch.arange(5, dtype=torch.int64), "g": torch.arange(6, dtype=torch.uint8),
               "h": torch.randn(4, 3).t()}  # not contiguous: laid out in row-major order
    encoded = checkpoints.Encoded.of(checkpoints.Checkpoint(model=tensors, signature={"x": 1}, spec={}))
    data = bytes(encoded)
    assert len(data) == len(encoded) == sum(len(chunk) for chunk in encoded)
    checkpoints.check(data)  # safetensors' own parser: offsets cover the data exactly
    (size,) = struct.unpack("<Q", data[:8])
    assert size % 8 == 0
    header = json.loads(data[8:8 + size])
    for name, entry in header.items():
        if name != "__metadata__":
            item = torch.empty((), dtype=load_tensors(data)[name].dtype).element_size()
            assert entry["data_offsets"][0] % item == 0, name
    loaded = load_tensors(data)
    assert set(loaded) == {f"model.{k}" for k in tensors}
    for name, tensor in tensors.items():
        assert loaded[f"model.{name}"].dtype == tensor.dtype and torch.equal(loaded[f"model.{name}"], tensor)
    assert checkpoints.decode(data).signature == {"x": 1}


def test_a_checkpoint_handed_over_is_unchanged_by_the_training_that_goes_on(spec_for, fake_hooks):
    # The worker writes a periodic checkpoint on another thread while training continues: what the
    # loop hands over must hold copies of everything training changes in place (weights, moments).
    class LateWriter(fake_hooks):
        def __init__(self):
            super().__init__()
            self.handed: list = []

        def on_checkpoint(self, epoch, step, data, **kwargs):
            super().on_checkpoint(epoch, step, data, **kwargs)
            self.handed.append(data)

    spec = spec_for(model={"dropout": 0.2}, epochs=3, batch_size=16, scheduler="cosine")
    hooks = LateWriter()
    train(spec, hooks=hooks)
    assert len(hooks.handed) == 3
    for recorded, handed in zip(hooks.checkpoints, hooks.handed):
        assert bytes(handed) == recorded.data  # written after the whole run: still the state at its step
    for earlier, later in zip(hooks.checkpoints, hooks.checkpoints[1:]):  # and training did change them
        before, after = checkpoints.decode(earlier.data).model, checkpoints.decode(later.data).model
        assert any(not torch.equal(before[name], after[name]) for name in before)
