"""Submit checks of the text generators: a corpus package that is missing, and arch/task/column mistakes."""

from __future__ import annotations

import dataclasses
import io

from app import catalog

LM = {"kind": "train", "name": "lm", "model": {"arch": "causal_lm", "block_size": 16}, "dataset": {"id": "builtin:fortunes"}}


def field_errors(response) -> dict[str, str]:
    return {e["field"]: e["message"] for e in response.get_json()["errors"]}


def test_a_missing_corpus_package_is_a_422_naming_it(client, auth, monkeypatch):
    entry = catalog.BUILTIN_DATASETS["fortunes"]
    monkeypatch.setitem(catalog.BUILTIN_DATASETS, "fortunes",
                        dataclasses.replace(entry, corpus_file="/nonexistent/games/fortunes/fortunes"))
    response = client.post("/api/v1/jobs", json=LM, headers=auth)
    assert response.status_code == 422
    assert "apt-get install fortunes" in field_errors(response)["dataset.id"]


def test_generators_serve_only_their_own_tasks(client, auth):
    response = client.post("/api/v1/jobs", json={**LM, "dataset": {"id": "builtin:iris"}}, headers=auth)
    assert response.status_code == 422 and "causal_lm does not serve classification" in field_errors(response)["model.arch"]
    response = client.post("/api/v1/jobs", json={**LM, "model": {"arch": "mlp"}}, headers=auth)
    assert response.status_code == 422 and "model.arch" in field_errors(response)
    response = client.post("/api/v1/jobs", json={**LM, "dataset": {"id": "builtin:fortunes", "target": "text"}},
                           headers=auth)
    assert response.status_code == 422 and "dataset.target" in field_errors(response)
    response = client.post("/api/v1/jobs", json={**LM, "model": {"arch": "causal_lm", "d_model": 30, "nhead": 4}},
                           headers=auth)
    assert response.status_code == 422 and "divisible" in field_errors(response)["model"]


def test_a_seq2seq_upload_needs_its_source_and_target_columns(client, auth):
    csv = "question,answer\na b,b a\nc d,d c\n".encode()
    upload = client.post("/api/v1/datasets", headers=auth,
                         data={"file": (io.BytesIO(csv), "pairs.csv")}, content_type="multipart/form-data")
    assert upload.status_code == 201, upload.get_json()
    dataset = upload.get_json()["id"]  # "dataset:<n>"
    spec = {"kind": "train", "name": "s2s", "model": {"arch": "seq2seq", "d_model": 16, "nhead": 2},
            "dataset": {"id": dataset, "task": "sequence_to_sequence"}}
    response = client.post("/api/v1/jobs", json=spec, headers=auth)
    assert response.status_code == 422 and "'source' is not a column" in field_errors(response)["dataset.text_column"]
    spec["dataset"].update(text_column="question")
    response = client.post("/api/v1/jobs", json=spec, headers=auth)
    assert response.status_code == 422 and "'target' is not a column" in field_errors(response)["dataset.target"]
    spec["dataset"].update(target="answer")
    assert client.post("/api/v1/jobs", json=spec, headers=auth).status_code == 201
