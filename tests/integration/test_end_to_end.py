"""End to end on real parts: the API, a real Redis, a real Celery worker process, real training."""

from __future__ import annotations

import numpy as np
import pytest

from app import storage
from app.jobs.schemas import SplitConfig
from tests.conftest import wait_for_job

pytestmark = pytest.mark.integration


def held_out_digits(n: int = 50) -> tuple[list[list[float]], list[int]]:
    """``n`` digits from the test split, which no training job ever sees."""
    from worker.ml.datasets import load_builtin_raw, split_indices

    x, y = load_builtin_raw("digits")
    _, _, test_idx = split_indices(len(x), SplitConfig())
    idx = np.asarray(test_idx)[:n]
    return x[idx].tolist(), [int(v) for v in y[idx]]


def train_and_check(client, auth, worker, settings, model: dict, hyperparameters: dict, min_accuracy: float) -> dict:
    spec = {"kind": "train", "name": f"digits-{model['arch']}", "model": model,
            "dataset": {"id": "builtin:digits"}, "hyperparameters": hyperparameters}
    r = client.post("/api/v1/jobs", json=spec, headers=auth)
    assert r.status_code == 201, r.get_json()
    job = wait_for_job(client, auth, r.get_json()["id"], worker=worker)
    assert job["state"] == "succeeded", job
    assert job["progress"] == 1.0

    epochs = [m for m in client.get(f"/api/v1/jobs/{job['id']}/metrics?scope=epoch", headers=auth).get_json()["items"]]
    assert [m["epoch"] for m in epochs] == list(range(1, hyperparameters["epochs"] + 1))
    assert epochs[-1]["values"]["train_loss"] < epochs[0]["values"]["train_loss"]
    assert job["latest_metrics"]["val_accuracy"] >= min_accuracy, job["latest_metrics"]

    assert job["checkpoints"], "every training job writes checkpoints"
    for ckpt in job["checkpoints"]:
        path = storage.resolve(settings.storage_root, ckpt["path"])
        assert path.is_file()
        assert storage.sha256_bytes(path.read_bytes()) == ckpt["sha256"]
        assert path.stat().st_size == ckpt["size_bytes"]
    # Each test trains as a fresh user, so this is the first version of the name.
    assert job["model"]["ref"] == f"digits-{model['arch']}@1"
    assert (job["model"]["name"], job["model"]["version"]) == (f"digits-{model['arch']}", 1)
    return job


def predict_and_score(client, auth, worker, model_ref: str, n: int = 50) -> float:
    inputs, labels = held_out_digits(n)
    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": model_ref, "inputs": inputs}, headers=auth)
    assert r.status_code == 201, r.get_json()
    job = wait_for_job(client, auth, r.get_json()["id"], worker=worker)
    assert job["state"] == "succeeded", job
    predictions = job["result"]["predictions"]
    assert len(predictions) == n
    assert all(abs(sum(p["probabilities"]) - 1.0) < 1e-4 for p in predictions)
    return sum(int(p["class"]) == label for p, label in zip(predictions, labels)) / n


def test_digits_mlp_trains_registers_and_predicts(client, auth, worker, settings):
    job = train_and_check(client, auth, worker, settings, {"arch": "mlp", "hidden_sizes": [128]},
                          {"epochs": 8, "batch_size": 32, "learning_rate": 0.003}, min_accuracy=0.9)
    accuracy = predict_and_score(client, auth, worker, str(job["id"]))
    assert accuracy >= 0.9, accuracy


def test_digits_lstm_tiny_preset(client, auth, worker, settings):
    # Bar 0.85: a tiny 1-layer LSTM reading the 8 image rows as 8 steps, a few epochs on CPU.
    job = train_and_check(client, auth, worker, settings, {"arch": "lstm", "hidden_size": 64},
                          {"epochs": 8, "batch_size": 32, "learning_rate": 0.005}, min_accuracy=0.85)
    assert predict_and_score(client, auth, worker, f"{job['model']['name']}@latest") >= 0.85


def test_digits_transformer_tiny_preset(client, auth, worker, settings):
    # Bar 0.85: a 1-layer, 32-wide encoder over the 8 rows, a few epochs on CPU.
    job = train_and_check(
        client, auth, worker, settings,
        {"arch": "transformer", "d_model": 32, "nhead": 4, "num_layers": 1, "dim_feedforward": 64, "dropout": 0.0},
        {"epochs": 8, "batch_size": 32, "learning_rate": 0.003}, min_accuracy=0.85,
    )
    assert predict_and_score(client, auth, worker, str(job["id"])) >= 0.85


def test_prediction_with_wrong_input_width_is_422_and_creates_nothing(client, auth, worker, settings):
    job = train_and_check(client, auth, worker, settings, {"arch": "mlp", "hidden_sizes": [32]},
                          {"epochs": 2}, min_accuracy=0.5)
    before = client.get("/api/v1/jobs?limit=200", headers=auth).get_json()["items"]
    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": str(job["id"]), "inputs": [[0.0] * 63]},
                    headers=auth)
    assert r.status_code == 422 and r.mimetype == "application/problem+json"
    assert r.get_json()["errors"][0]["field"] == "inputs[0]" and "expects 64" in r.get_json()["detail"]
    assert client.get("/api/v1/jobs?limit=200", headers=auth).get_json()["items"] == before


def test_another_user_cannot_predict_with_my_model(client, make_user, worker, settings):
    _, alice = make_user()
    _, bob = make_user()
    a, b = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    job = train_and_check(client, a, worker, settings, {"arch": "mlp", "hidden_sizes": [16]}, {"epochs": 2}, 0.3)
    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": str(job["id"]), "inputs": [[0.0] * 64]},
                    headers=b)
    assert r.status_code == 422 and "no trained model" in r.get_json()["detail"]


def test_fine_tuning_starts_from_the_trained_weights(client, auth, worker, settings):
    base = train_and_check(client, auth, worker, settings, {"arch": "mlp", "hidden_sizes": [64]},
                           {"epochs": 4, "learning_rate": 0.003}, min_accuracy=0.85)
    spec = {"kind": "train", "name": "digits-finetuned", "model": {"arch": "mlp", "hidden_sizes": [64]},
            "dataset": {"id": "builtin:digits"}, "hyperparameters": {"epochs": 1, "learning_rate": 0.0005},
            "init_from": f"{base['model']['name']}@latest"}
    job = wait_for_job(client, auth, client.post("/api/v1/jobs", json=spec, headers=auth).get_json()["id"], worker=worker)
    assert job["state"] == "succeeded", job
    assert job["init_from"] == f"{base['model']['name']}@1"  # pinned at submit
    # One slow epoch keeps the accuracy the base reached; from random weights it would be far lower.
    assert job["latest_metrics"]["val_accuracy"] >= base["latest_metrics"]["val_accuracy"] - 0.01
    bad = client.post("/api/v1/jobs", json={**spec, "model": {"arch": "lstm"}}, headers=auth)
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "init_from"


def test_cuda_requested_on_a_cpu_worker_fails_as_user_error_without_retries(client, auth, worker):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this worker has CUDA")
    spec = {"kind": "train", "name": "wants-gpu", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
            "hyperparameters": {"epochs": 1}, "resources": {"device": "cuda"}}
    job = wait_for_job(client, auth, client.post("/api/v1/jobs", json=spec, headers=auth).get_json()["id"], worker=worker)
    assert job["state"] == "failed" and job["error"]["class"] == "user_error"
    assert "cuda" in job["error"]["message"].lower() and job["attempts"] == 1
    history = job["attempt_history"]
    assert [(a["number"], a["outcome"]) for a in history] == [(1, "user_error")]
    assert history[0]["pid"] > 0 and history[0]["ended_at"] is not None


def test_sine_forecasting_beats_the_naive_forecast_and_predicts_a_horizon(client, auth, worker):
    spec = {"kind": "train", "name": "sine-lstm", "model": {"arch": "lstm", "hidden_size": 32},
            "dataset": {"id": "builtin:sine", "window": 16, "horizon": 3},
            "hyperparameters": {"epochs": 6, "batch_size": 32, "learning_rate": 0.005}}
    job = wait_for_job(client, auth, client.post("/api/v1/jobs", json=spec, headers=auth).get_json()["id"],
                       worker=worker)
    assert job["state"] == "succeeded", job
    test = job["result"]["test_metrics"]
    assert test["test_rmse"] < test["test_naive_rmse"], test
    from worker.ml.datasets import load_builtin_raw

    series = np.asarray(load_builtin_raw("sine")[0]).reshape(-1)
    window = series[-16:].tolist()
    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": "sine-lstm@latest", "inputs": [window]},
                    headers=auth)
    assert r.status_code == 201, r.get_json()
    pred = wait_for_job(client, auth, r.get_json()["id"], worker=worker)
    assert pred["state"] == "succeeded", pred
    values = pred["result"]["predictions"][0]["values"]
    assert len(values) == 3 and all(np.isfinite(values))
    bad = client.post("/api/v1/jobs", json={"kind": "predict", "model": "sine-lstm@latest", "inputs": [window[:10]]},
                      headers=auth)
    assert bad.status_code == 422 and "expects 16" in bad.get_json()["detail"]


def _upload(client, auth, frame, name: str) -> str:
    import io

    r = client.post("/api/v1/datasets", headers=auth, content_type="multipart/form-data",
                    data={"file": (io.BytesIO(frame.to_csv(index=False).encode()), name)})
    assert r.status_code == 201, r.get_json()
    return r.get_json()["id"]


def test_training_on_an_uploaded_csv_and_predicting_from_it(client, auth, worker):
    import pandas as pd

    rng = np.random.default_rng(1)
    n = 400
    label = rng.integers(0, 2, n)
    frame = pd.DataFrame({"x1": rng.normal(label * 3.0, 1.0), "x2": rng.normal(-label * 2.0, 1.0),
                          "note": ["row"] * n, "kind": np.where(label == 1, "spam", "ham")})
    ds = _upload(client, auth, frame, "blobs.csv")
    spec = {"kind": "train", "name": "blobs", "model": {"arch": "mlp", "hidden_sizes": [16]},
            "dataset": {"id": ds, "target": "kind", "features": ["x1", "x2"]},
            "hyperparameters": {"epochs": 20, "learning_rate": 0.01}}
    job = wait_for_job(client, auth, client.post("/api/v1/jobs", json=spec, headers=auth).get_json()["id"],
                       worker=worker)
    assert job["state"] == "succeeded", job
    assert job["result"]["test_metrics"]["test_accuracy"] >= 0.9
    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": "blobs@latest",
                                          "inputs": [[3.0, -2.0], [0.0, 0.0]]}, headers=auth)
    pred = wait_for_job(client, auth, r.get_json()["id"], worker=worker)
    assert [p["class"] for p in pred["result"]["predictions"]] == ["spam", "ham"]


def test_text_classification_on_an_uploaded_csv(client, auth, worker):
    import pandas as pd

    rng = np.random.default_rng(2)
    topics = {"sport": "goal match team score coach", "food": "bake flour oven sauce garlic"}
    filler = "the a of and to in is was".split()
    rows = []
    for _ in range(300):
        topic = rng.choice(sorted(topics))
        words = list(rng.choice(topics[topic].split(), 2)) + list(rng.choice(filler, 5))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "topic": topic})
    ds = _upload(client, auth, pd.DataFrame(rows), "texts.csv")
    spec = {"kind": "train", "name": "topics", "model": {"arch": "lstm", "hidden_size": 32},
            "dataset": {"id": ds, "target": "topic", "text_column": "text"},
            "hyperparameters": {"epochs": 15, "learning_rate": 0.005}}
    job = wait_for_job(client, auth, client.post("/api/v1/jobs", json=spec, headers=auth).get_json()["id"],
                       worker=worker)
    assert job["state"] == "succeeded", job
    assert job["result"]["test_metrics"]["test_accuracy"] >= 0.8  # two classes: chance is 0.5
    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": "topics@latest",
                                          "inputs": ["the coach saw a goal", "bake it in the oven"]}, headers=auth)
    pred = wait_for_job(client, auth, r.get_json()["id"], worker=worker)
    assert pred["state"] == "succeeded", pred
    assert [p["class"] for p in pred["result"]["predictions"]] == ["sport", "food"]
    bad = client.post("/api/v1/jobs", json={"kind": "predict", "model": "topics@latest", "inputs": [[1, 2]]},
                      headers=auth)
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "inputs[0]"


def _shape_png(label: str, rng, size: int = 12) -> bytes:
    """A bright vertical bar or a ring on a noisy dark background, as RGB PNG bytes."""
    import io

    from PIL import Image

    image = rng.integers(0, 60, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(4, size - 4, 2)
    mask = (abs(xx - cx) <= 1) if label == "bar" else (abs(np.hypot(yy - cy, xx - cx) - 3) < 1)
    image[mask] = 230
    out = io.BytesIO()
    Image.fromarray(image.astype(np.uint8), "RGB").save(out, "PNG")
    return out.getvalue()


def _predict_shapes(client, auth, worker, model_ref: str) -> None:
    import base64

    rng = np.random.default_rng(123)  # images no training job saw
    labels = ["circle", "bar", "bar", "circle"]
    inputs = [base64.b64encode(_shape_png(label, rng)).decode() for label in labels]
    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": model_ref, "inputs": inputs}, headers=auth)
    assert r.status_code == 201, r.get_json()
    pred = wait_for_job(client, auth, r.get_json()["id"], worker=worker)
    assert pred["state"] == "succeeded", pred
    assert [p["class"] for p in pred["result"]["predictions"]] == labels
    assert all(len(p["probabilities"]) == 2 for p in pred["result"]["predictions"])
    for bad_input in ("%%% not base64 %%%", base64.b64encode(b"plain text, not a picture").decode(), [1.0, 2.0]):
        bad = client.post("/api/v1/jobs", json={"kind": "predict", "model": model_ref,
                                                "inputs": [inputs[0], bad_input]}, headers=auth)
        assert bad.status_code == 422 and bad.get_json()["errors"][0]["field"] == "inputs[1]", bad.get_json()


@pytest.mark.parametrize("container", ["zip", "parquet"])
def test_uploaded_images_train_a_cnn_and_predict_held_out_images(client, auth, worker, container):
    import io
    import zipfile

    import pandas as pd

    rng = np.random.default_rng(7)
    labels = ["bar", "circle"] * 40
    pictures = [_shape_png(label, rng) for label in labels]
    if container == "zip":
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            for i, (label, data) in enumerate(zip(labels, pictures)):
                archive.writestr(f"{label}/{i:03d}.png", data)
        dataset = {}
    else:
        out = io.BytesIO()
        pd.DataFrame({"png": pictures, "shape": labels}).to_parquet(out)
        dataset = {"image_column": "png", "target": "shape"}
    r = client.post("/api/v1/datasets", headers=auth, content_type="multipart/form-data",
                    data={"file": (io.BytesIO(out.getvalue()), f"shapes.{container}")})
    assert r.status_code == 201, r.get_json()
    spec = {"kind": "train", "name": f"shapes-{container}", "model": {"arch": "cnn2d", "channels": [16, 32]},
            "dataset": {"id": r.get_json()["id"], "image_size": 12, **dataset,
                        "augment": {"horizontal_flip": True, "crop_padding": 1}},
            "hyperparameters": {"epochs": 12, "batch_size": 16, "learning_rate": 0.01}}
    r = client.post("/api/v1/jobs", json=spec, headers=auth)
    assert r.status_code == 201, r.get_json()
    job = wait_for_job(client, auth, r.get_json()["id"], worker=worker)
    assert job["state"] == "succeeded", job
    assert job["result"]["test_metrics"]["test_accuracy"] >= 0.9, job["result"]["test_metrics"]
    _predict_shapes(client, auth, worker, f"shapes-{container}@latest")
