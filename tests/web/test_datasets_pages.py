"""Dataset pages and API: upload through the form, schema and first rows, delete refused while a job uses it; models page."""

from __future__ import annotations

import io
import re

from app.db import session_scope
from app.models import Checkpoint, Job, ModelVersion
from tests.web.test_pages import PASSWORD, csrf_token, person, sign_in  # noqa: F401 - person is a fixture

CSV = b"temp,humidity,label\n" + b"".join(f"{20 + i},{50 + i % 7},{'yes' if i % 2 else 'no'}\n".encode() for i in range(60))


def upload_page(client, data: bytes = CSV, filename: str = "weather.csv"):
    token = csrf_token(client.get("/datasets").get_data(as_text=True))
    return client.post("/datasets", data={"csrf_token": token, "name": "weather", "file": (io.BytesIO(data), filename)},
                       content_type="multipart/form-data")


def train_on(dataset_id: int) -> dict:
    return {"kind": "train", "name": "on-upload", "model": {"arch": "mlp"},
            "dataset": {"id": f"dataset:{dataset_id}", "target": "label"}, "hyperparameters": {"epochs": 1}}


def test_upload_through_the_page_shows_schema_and_first_rows(client, person):
    email, _ = person()
    sign_in(client, email, PASSWORD)
    page = client.get("/datasets").get_data(as_text=True)
    assert 'enctype="multipart/form-data"' in page and "At most 200 MiB" in page and 'for="file"' in page
    response = upload_page(client)
    assert response.status_code == 303
    detail = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "Uploaded weather: 60 rows." in detail
    assert re.search(r"<code>humidity</code></td><td[^>]*>int64", detail)
    preview = detail.split("First 20 rows", 1)[1]
    assert preview.count("<tr>") == 21  # header + 20 rows, not all 60
    assert ">20<" in preview and ">39<" in preview and ">40<" not in preview
    listing = client.get("/datasets").get_data(as_text=True)
    assert "weather" in listing and "builtin:digits" in listing


def test_a_bad_file_is_refused_on_the_form_with_a_message(client, person):
    email, _ = person()
    sign_in(client, email, PASSWORD)
    response = upload_page(client, b"", "empty.csv")
    assert response.status_code == 422 and "the file is empty" in response.get_data(as_text=True)
    response = upload_page(client, b"x", "notes.txt")
    assert response.status_code == 422 and "unsupported format" in response.get_data(as_text=True)


def test_delete_is_refused_while_a_queued_job_uses_the_dataset_and_allowed_after(client, person, settings):
    email, headers = person()
    sign_in(client, email, PASSWORD)
    dataset_id = int(upload_page(client).headers["Location"].rsplit("/", 1)[1])
    job = client.post("/api/v1/jobs", json=train_on(dataset_id), headers=headers)
    assert job.status_code == 201, job.get_json()
    page = client.get(f"/datasets/{dataset_id}").get_data(as_text=True)
    refused = client.post(f"/datasets/{dataset_id}/delete", data={"csrf_token": csrf_token(page)},
                          follow_redirects=True)
    assert f"used by jobs that have not ended (#{job.get_json()['id']})" in refused.get_data(as_text=True)
    assert client.get(f"/datasets/{dataset_id}").status_code == 200
    assert client.post(f"/api/v1/jobs/{job.get_json()['id']}/cancel", headers=headers).status_code == 202
    with session_scope(settings.database_url) as s:
        from app.models import Dataset

        path = settings.storage_root / s.get(Dataset, dataset_id).path
    assert path.exists()
    done = client.post(f"/datasets/{dataset_id}/delete", data={"csrf_token": csrf_token(page)}, follow_redirects=True)
    assert f"Dataset {dataset_id} deleted." in done.get_data(as_text=True)
    assert client.get(f"/datasets/{dataset_id}").status_code == 404 and not path.exists()


def test_delete_without_csrf_or_by_a_viewer_is_refused(client, person, database_url):
    email, headers = person()
    dataset_id = client.post("/api/v1/datasets", headers=headers,
                             data={"file": (io.BytesIO(CSV), "w.csv")}, content_type="multipart/form-data").get_json()["id"].split(":")[1]
    sign_in(client, email, PASSWORD)
    assert client.post(f"/datasets/{dataset_id}/delete").status_code == 400
    viewer, _ = person("viewer")
    other = client.application.test_client()
    sign_in(other, viewer, PASSWORD)
    page = other.get("/datasets").get_data(as_text=True)
    assert "Upload a dataset" not in page
    assert other.post(f"/datasets/{dataset_id}/delete", data={"csrf_token": csrf_token(page)}).status_code == 403
    assert other.get(f"/datasets/{dataset_id}").status_code == 404  # another user's dataset


def test_api_delete_answers_204_409_and_404(client, person):
    _, headers = person()
    _, other = person()
    dataset_id = client.post("/api/v1/datasets", headers=headers,
                             data={"file": (io.BytesIO(CSV), "w.csv")}, content_type="multipart/form-data").get_json()["id"].split(":")[1]
    rows = client.get(f"/api/v1/datasets/{dataset_id}/rows?limit=3", headers=headers).get_json()
    assert rows["columns"] == ["temp", "humidity", "label"] and rows["rows"] == [[20, 50, "no"], [21, 51, "yes"], [22, 52, "no"]]
    assert client.get(f"/api/v1/datasets/{dataset_id}/rows?limit=0", headers=headers).status_code == 422
    assert client.get(f"/api/v1/datasets/{dataset_id}/rows", headers=other).status_code == 404
    job_id = client.post("/api/v1/jobs", json=train_on(dataset_id), headers=headers).get_json()["id"]
    busy = client.delete(f"/api/v1/datasets/{dataset_id}", headers=headers)
    assert busy.status_code == 409 and busy.mimetype == "application/problem+json"
    assert f"#{job_id}" in busy.get_json()["detail"]
    assert client.delete(f"/api/v1/datasets/{dataset_id}", headers=other).status_code == 404
    client.post(f"/api/v1/jobs/{job_id}/cancel", headers=headers)
    assert client.delete(f"/api/v1/datasets/{dataset_id}", headers=headers).status_code == 204
    assert client.get(f"/api/v1/datasets/{dataset_id}", headers=headers).status_code == 404
    assert client.delete(f"/api/v1/datasets/{dataset_id}", headers=headers).status_code == 404


def _model_version(database_url: str, email: str, name: str, version: int, accuracy: float) -> tuple[int, int]:
    """A succeeded job, its checkpoint and the version the runner would register (job id, version id)."""
    from sqlalchemy import select

    from app.models import User

    with session_scope(database_url) as s:
        owner = s.execute(select(User).where(User.email == email)).scalar_one()
        job = Job(owner_id=owner.id, kind="train", name=name, state="succeeded", queue="train", spec={})
        s.add(job)
        s.flush()
        ckpt = Checkpoint(job_id=job.id, attempt=1, epoch=1, step=10, path=f"checkpoints/{job.id}/a.safetensors",
                          size_bytes=1, sha256="0" * 64)
        s.add(ckpt)
        s.flush()
        mv = ModelVersion(owner_id=owner.id, name=name, version=version, job_id=job.id, checkpoint_id=ckpt.id,
                          arch="mlp", task="classification", signature={"input_shape": [4]},
                          metrics={"val_accuracy": accuracy})
        s.add(mv)
        s.flush()
        return job.id, mv.id


def test_the_models_page_lists_versions_with_metrics_source_job_and_predict_link(client, person, database_url):
    email, _ = person()
    job1, _ = _model_version(database_url, email, "iris-mlp", 1, 0.9)
    job2, _ = _model_version(database_url, email, "iris-mlp", 2, 0.9667)
    sign_in(client, email, PASSWORD)
    page = client.get("/models").get_data(as_text=True)
    assert "<h2" in page and "iris-mlp" in page
    assert page.index(f"job #{job2}") < page.index(f"job #{job1}")  # newest version first
    assert "val_accuracy = 0.9667" in page and f'href="/jobs/{job1}"' in page
    assert 'href="/jobs/predict?model=iris-mlp@2"' in page and "Predict with this model" in page
    stranger, _ = person()
    other = client.application.test_client()
    sign_in(other, stranger, PASSWORD)
    assert "iris-mlp" not in other.get("/models").get_data(as_text=True)
