"""Images: cnn2d on the digits as images, zip uploads, seeded augmentation and exact resume, image inputs."""

from __future__ import annotations

import base64
import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from app.jobs.errors import UserError
from worker.ml import checkpoints
from worker.ml.datasets import load_builtin_raw
from worker.ml.prediction import predict
from worker.ml.training import train

from .test_ml_training import reproducible, weights

CNN = {"channels": [16, 32]}


def png(pixels: np.ndarray, mode: str = "L") -> bytes:
    """PNG bytes of uint8 pixels."""
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode).save(out, "PNG")
    return out.getvalue()


def digit_png(row: np.ndarray) -> str:
    """A digits row (64 values 0..16) as a base64 grey PNG, as a client would send it."""
    return base64.b64encode(png(np.round(row.reshape(8, 8) * 255 / 16))).decode()


def test_cnn2d_on_digit_images_reaches_the_bar_and_predicts_pngs(spec_for, hooks):
    # Time is not asserted here (benchmarks measure speed); the preset takes seconds on one thread.
    result = train(spec_for("cnn2d", "builtin:digits_images", model=CNN, epochs=8, learning_rate=0.01), hooks=hooks)
    assert result.test_metrics["test_accuracy"] >= 0.97, result.test_metrics
    sig = result.signature
    assert (sig["input_kind"], sig["image_shape"], sig["image_size"]) == ("image", [1, 8, 8], 8)
    assert len(sig["image_mean"]) == 1 and sig["image_std"][0] > 0
    saved = checkpoints.decode(hooks.checkpoints[-1].data)
    assert saved.signature["image_mean"] == sig["image_mean"]
    assert tuple(saved.normalizer["features.mean"].shape) == (1, 1, 1)
    x, y = load_builtin_raw("digits")
    out = predict(hooks.checkpoints[-1].data, [digit_png(x[i]) for i in range(60)])["predictions"]
    assert sum(p["class"] == int(y[i]) for i, p in enumerate(out)) >= 57
    assert all(abs(sum(p["probabilities"]) - 1) < 1e-5 for p in out)


def test_image_size_resizes_and_the_mlp_reads_images_flat(spec_for, hooks):
    result = train(spec_for("mlp", "builtin:digits_images", model={"hidden_sizes": [32]}, data={"image_size": 12},
                            epochs=3, learning_rate=0.01), hooks=hooks)
    assert result.signature["input_shape"] == [1, 12, 12]
    assert result.test_metrics["test_accuracy"] > 0.8
    x, _ = load_builtin_raw("digits")
    assert len(predict(hooks.checkpoints[-1].data, [digit_png(x[0])])["predictions"]) == 1


def test_architectures_that_do_not_serve_the_task_are_user_errors(spec_for, hooks):
    with pytest.raises(UserError, match="cnn2d does not serve classification"):
        train(spec_for("cnn2d", "builtin:digits", epochs=1), hooks=hooks)
    with pytest.raises(UserError, match="lstm does not serve image_classification"):
        train(spec_for("lstm", "builtin:digits_images", epochs=1), hooks=hooks)


AUGMENTED = {"augment": {"horizontal_flip": True, "crop_padding": 2}}


@pytest.mark.parametrize("stop_at", [9, 32])  # mid-epoch, and at the end of epoch 1 (32 steps each)
def test_stop_then_resume_with_augmentation_matches_an_uninterrupted_run(stop_at, spec_for, fake_hooks):
    spec = spec_for("cnn2d", "builtin:digits_images", model={"channels": [8, 16], "dropout": 0.2}, data=AUGMENTED,
                    epochs=3, batch_size=40, learning_rate=0.01, scheduler="cosine")
    straight_hooks = fake_hooks()
    straight = train(spec, hooks=straight_hooks)

    stopped_hooks = fake_hooks(stop_at_step=stop_at, stop_reason_value="shutdown")
    stopped = train(spec, hooks=stopped_hooks)
    assert stopped.stopped == "shutdown" and stopped.steps == stop_at

    resumed_hooks = fake_hooks()
    resumed = train(spec, hooks=resumed_hooks, resume=stopped_hooks.checkpoints[-1].data)
    assert resumed.steps == straight.steps
    assert reproducible(resumed.final_metrics) == pytest.approx(reproducible(straight.final_metrics), abs=1e-6)
    assert resumed.test_metrics == pytest.approx(straight.test_metrics, abs=1e-6)
    final_a, final_b = weights(straight_hooks.checkpoints[-1].data), weights(resumed_hooks.checkpoints[-1].data)
    for name in final_a:  # batch norm's running statistics included
        torch.testing.assert_close(final_a[name], final_b[name], atol=1e-6, rtol=0)


def test_augmentation_changes_training_and_depends_on_the_seed(spec_for, fake_hooks):
    plain = train(spec_for("cnn2d", "builtin:digits_images", model={"channels": [8]}, epochs=1), hooks=fake_hooks())
    augmented = train(spec_for("cnn2d", "builtin:digits_images", model={"channels": [8]}, data=AUGMENTED, epochs=1),
                      hooks=fake_hooks())
    again = train(spec_for("cnn2d", "builtin:digits_images", model={"channels": [8]}, data=AUGMENTED, epochs=1),
                  hooks=fake_hooks())
    assert augmented.final_metrics["train_loss"] != plain.final_metrics["train_loss"]
    assert augmented.final_metrics["train_loss"] == again.final_metrics["train_loss"]


def shapes_zip(path, per_class: int = 30, size: int = 12, seed: int = 0) -> None:
    """A zip of ``circle/`` and ``bar/`` class folders of small noisy RGB PNGs."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as archive:
        for label in ("bar", "circle"):
            for i in range(per_class):
                archive.writestr(f"shapes/{label}/{i:03d}.png", png(shape_image(label, rng, size), "RGB"))


def shape_image(label: str, rng: np.random.Generator, size: int = 12) -> np.ndarray:
    """A bright vertical bar or a ring on a noisy dark background, at a random place."""
    image = rng.integers(0, 60, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(4, size - 4, 2)
    mask = (abs(xx - cx) <= 1) if label == "bar" else (abs(np.hypot(yy - cy, xx - cx) - 3) < 1)
    image[mask] = 230
    return image


def test_a_zip_of_class_folders_trains_and_rejects_a_damaged_image(tmp_path, spec_for, hooks):
    archive = tmp_path / "shapes.zip"
    shapes_zip(archive)
    spec = spec_for("cnn2d", "dataset:1", model=CNN, data={"image_size": 12}, epochs=12, batch_size=16,
                    learning_rate=0.01)
    result = train(spec, hooks=hooks, dataset_file=archive, dataset_format="zip")
    assert result.signature["classes"] == ["bar", "circle"] and result.signature["channels"] == 3
    assert result.test_metrics["test_accuracy"] >= 0.9, result.test_metrics
    rng = np.random.default_rng(99)
    inputs = [base64.b64encode(png(shape_image(label, rng), "RGB")).decode() for label in ("circle", "bar")]
    assert [p["class"] for p in predict(hooks.checkpoints[-1].data, inputs)["predictions"]] == ["circle", "bar"]
    with pytest.raises(UserError, match="not base64"):
        predict(hooks.checkpoints[-1].data, ["not an image!"])

    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("shapes/bar/broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(UserError, match="broken.png|image 60"):
        train(spec, hooks=hooks, dataset_file=archive, dataset_format="zip")
