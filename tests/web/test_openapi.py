"""The OpenAPI document is the contract: every API route is in it, and real answers validate against it."""

from __future__ import annotations

import io
import os
import uuid

import pytest
from pydantic import BaseModel

from app import storage
from app.db import session_scope
from app.models import Attempt, Checkpoint, Metric, ModelVersion, WebhookDelivery, utcnow
from app.web import resources
from app.web.openapi import PREFIX, ROUTES, document, rule_path

TRAIN = {"kind": "train", "name": "contract-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:iris"},
         "hyperparameters": {"epochs": 1}}
SKIPPED_METHODS = {"HEAD", "OPTIONS"}


def api_routes(app) -> set[tuple[str, str]]:
    """Every (method, rule under /api/v1) the app serves."""
    return {(method, rule.rule[len(PREFIX):]) for rule in app.url_map.iter_rules() if rule.rule.startswith(PREFIX + "/")
            for method in rule.methods - SKIPPED_METHODS}


def test_every_api_route_is_documented_and_every_documented_route_exists(app):
    served = api_routes(app)
    missing = sorted(served - set(ROUTES))
    assert not missing, f"add these routes to app.web.openapi.ROUTES: {missing}"
    stale = sorted(set(ROUTES) - served)
    assert not stale, f"documented but not served: {stale}"
    paths = document()["paths"]
    for method, rule in served:
        operation = paths[rule_path(rule)][method.lower()]
        assert operation["summary"] and operation["responses"]


def test_document_is_served_at_both_urls_and_rendered_by_the_docs_page(client):
    doc = client.get("/api/v1/openapi.json")
    assert doc.status_code == 200 and doc.get_json()["openapi"] == "3.1.0"
    page = client.get("/api/docs")
    assert page.status_code == 200 and b"/api/v1/openapi.json" in page.data
    script = client.get("/static/vendor/redoc/redoc.standalone.js")
    assert script.status_code == 200 and len(script.data) > 100_000  # the bundle, served here (no CDN)
    script.close()
    # Every operation but the document itself needs a token; reads also take the browser's cookie.
    jobs = doc.get_json()["paths"]["/jobs"]
    assert jobs["get"]["security"] == [{"bearer": []}, {"cookie": []}] and jobs["post"]["security"] == [{"bearer": []}]
    assert {"ETag", "RateLimit-Limit"} <= set(jobs["get"]["responses"]["200"]["headers"])
    assert "Retry-After" in jobs["post"]["responses"]["429"]["headers"]
    assert "multipart/form-data" in doc.get_json()["paths"]["/datasets"]["post"]["requestBody"]["content"]


def conforms(response, method: str, rule: str) -> dict | list | None:
    """Assert ``response`` is one the route table documents, and its body validates against its model."""
    op = ROUTES[(method, rule)]
    status = response.status_code
    body = response.get_json(silent=True)
    if status >= 400:
        assert response.mimetype == "application/problem+json", (status, response.data[:300])
        resources.Problem.model_validate(body)
        return body
    assert status in op.answers or status == 304, (method, rule, status, body)
    answer = op.answers[status]
    for header in answer.headers:
        assert header in response.headers, (method, rule, header)
    if isinstance(answer.model, type) and issubclass(answer.model, BaseModel):
        assert response.mimetype == "application/json"
        answer.model.model_validate(body)
    return body


@pytest.fixture
def admin_auth(make_user):
    _, token = make_user(admin=True)
    return {"Authorization": f"Bearer {token}"}


def _add_history(settings, job_id: int, owner_id: int) -> None:
    """What a worker would have written: an attempt, metrics, a checkpoint, a model version, a delivery."""
    relative = f"checkpoints/{job_id}/contract-{os.urandom(4).hex()}.safetensors"
    size, digest = storage.write_atomic(settings.storage_root, relative, b"weights" * 10)
    with session_scope(settings.database_url, write=True) as s:
        s.add(Attempt(job_id=job_id, number=1, worker="w1", host="h", pid=1, start_epoch=0, start_step=0))
        s.add(Metric(job_id=job_id, attempt=1, scope="epoch", epoch=1, step=10, values={"val_loss": 0.5, "acc": None}))
        s.add(Metric(job_id=job_id, attempt=1, scope="step", epoch=1, step=5, values={"train_loss": 0.7}))
        ckpt = Checkpoint(job_id=job_id, attempt=1, epoch=1, step=10, path=relative, size_bytes=size, sha256=digest,
                          metric_name="val_loss", metric_value=0.5, is_best=True, reason="epoch")
        s.add(ckpt)
        s.flush()
        s.add(ModelVersion(owner_id=owner_id, name=f"contract{uuid.uuid4().hex[:6]}", version=1, job_id=job_id,
                           checkpoint_id=ckpt.id, arch="mlp", task="classification",
                           signature={"inputs": 4}, metrics={"val_loss": 0.5}))
        s.add(WebhookDelivery(job_id=job_id, message_id=f"msg_{uuid.uuid4().hex}", event="running",
                              payload={"type": "job.running"}))


def test_real_answers_validate_against_the_documented_models(client, admin_auth, make_user, settings):
    user_id, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    created = client.post("/api/v1/jobs", json={**TRAIN, "metadata": {"team": "contract"}}, headers=auth)
    job = conforms(created, "POST", "/jobs")
    job_id = job["id"]
    _add_history(settings, job_id, user_id)
    jid = "/jobs/<int:job_id>"
    detail = conforms(client.get(f"/api/v1/jobs/{job_id}", headers=auth), "GET", jid)
    assert detail["checkpoints"] and detail["attempt_history"] and detail["latest_metrics"]
    listed = conforms(client.get("/api/v1/jobs?limit=1", headers=auth), "GET", "/jobs")
    assert listed["items"][0]["id"] == job_id
    page = conforms(client.get(f"/api/v1/jobs/{job_id}/metrics", headers=auth), "GET", jid + "/metrics")
    resources.MetricPage.model_validate(page)
    curves = conforms(client.get(f"/api/v1/jobs/{job_id}/metrics?points=4", headers=auth), "GET", jid + "/metrics")
    resources.MetricCurves.model_validate(curves)
    assert conforms(client.get(f"/api/v1/jobs/{job_id}/events", headers=auth), "GET", jid + "/events")["items"]
    ckpts = conforms(client.get(f"/api/v1/jobs/{job_id}/checkpoints", headers=auth), "GET", jid + "/checkpoints")
    download = client.get(ckpts["items"][0]["download"], headers=auth)
    conforms(download, "GET", jid + "/checkpoints/<int:checkpoint_id>/download")
    download.close()
    assert conforms(client.get(f"/api/v1/jobs/{job_id}/logs", headers=auth), "GET", jid + "/logs")["items"]
    deliveries = client.get(f"/api/v1/jobs/{job_id}/webhook-deliveries", headers=auth)
    assert conforms(deliveries, "GET", jid + "/webhook-deliveries")["items"]
    conforms(client.get(f"/api/v1/jobs/{job_id}/output", headers=auth), "GET", jid + "/output")  # 404: not a batch
    models = conforms(client.get("/api/v1/models", headers=auth), "GET", "/models")
    assert models["items"][0]["job_id"] == job_id
    name, version = models["items"][0]["name"], models["items"][0]["version"]
    moved = conforms(client.put(f"/api/v1/models/{name}/aliases/production", json={"version": version}, headers=auth),
                     "PUT", "/models/<name>/aliases/<alias>")
    assert moved["aliases"]["production"] == version
    assert conforms(client.get(f"/api/v1/models/{name}", headers=auth), "GET", "/models/<name>")["versions"]
    conforms(client.get(f"/api/v1/models/{name}/versions/{version}", headers=auth),
             "GET", "/models/<name>/versions/<int:number>")
    refused = client.delete(f"/api/v1/models/{name}/versions/{version}", headers=auth)
    assert refused.status_code == 409  # the alias points at it
    conforms(refused, "DELETE", "/models/<name>/versions/<int:number>")
    conforms(client.delete(f"/api/v1/models/{name}/aliases/production", headers=auth),
             "DELETE", "/models/<name>/aliases/<alias>")
    conforms(client.get("/api/v1/pretrained", headers=auth), "GET", "/pretrained")
    for action in ("pause", "resume", "cancel", "retry"):
        conforms(client.post(f"/api/v1/jobs/{job_id}/{action}", headers=auth), "POST", jid + "/" + action)

    upload = client.post("/api/v1/datasets", headers=auth, content_type="multipart/form-data",
                         data={"file": (io.BytesIO(b"a,b,label\n1,2,x\n3,4,y\n"), "tiny.csv"), "name": "tiny"})
    dataset = conforms(upload, "POST", "/datasets")
    number = int(dataset["id"].split(":")[1])
    datasets = conforms(client.get("/api/v1/datasets", headers=auth), "GET", "/datasets")
    assert {d["builtin"] for d in datasets["items"]} == {True, False}
    conforms(client.get(f"/api/v1/datasets/{number}", headers=auth), "GET", "/datasets/<int:dataset_id>")
    rows = client.get(f"/api/v1/datasets/{number}/rows?limit=1", headers=auth)
    assert conforms(rows, "GET", "/datasets/<int:dataset_id>/rows")["rows"] == [[1, 2, "x"]]
    conforms(client.delete(f"/api/v1/datasets/{number}", headers=auth), "DELETE", "/datasets/<int:dataset_id>")

    new_token = conforms(client.post("/api/v1/tokens", json={"name": "ci", "expires_at": "2999-01-01"},
                                     headers=auth), "POST", "/tokens")
    conforms(client.get("/api/v1/tokens", headers=auth), "GET", "/tokens")
    conforms(client.delete(f"/api/v1/tokens/{new_token['id']}", headers=auth), "DELETE", "/tokens/<int:token_id>")
    conforms(client.get("/api/v1/webhook-secret", headers=auth), "GET", "/webhook-secret")
    conforms(client.post("/api/v1/webhook-secret", headers=auth), "POST", "/webhook-secret")
    conforms(client.get("/api/v1/webhook-secret", headers=auth), "GET", "/webhook-secret")
    usage = conforms(client.get("/api/v1/usage", headers=auth), "GET", "/usage")
    assert usage["users"][0]["per_job"]

    user = conforms(client.post("/api/v1/users", json={"email": f"c{uuid.uuid4().hex[:8]}@example.com",
                                                       "role": "viewer"}, headers=admin_auth), "POST", "/users")
    conforms(client.get("/api/v1/users", headers=admin_auth), "GET", "/users")
    conforms(client.patch(f"/api/v1/users/{user['id']}", json={"active": False}, headers=admin_auth),
             "PATCH", "/users/<int:user_id>")
    overview = conforms(client.get("/api/v1/admin/overview", headers=admin_auth), "GET", "/admin/overview")
    assert overview["queues"]
    conforms(client.get("/api/v1/usage", headers=admin_auth), "GET", "/usage")
    inline = client.post("/api/v1/models/no-such-model@1/predict?wait=0", json={"inputs": [[1, 2, 3, 4]]}, headers=auth)
    assert conforms(inline, "POST", "/models/<path:ref>/predict")["status"] == 422
    waited = client.post("/api/v1/jobs?wait=0", json=TRAIN, headers=auth)
    assert waited.status_code == 202 and conforms(waited, "POST", "/jobs")["state"] == "queued"
