"""The JSON API without workers: validation, tenancy, authentication, listing, cancellation."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from app.db import session_scope
from app.models import Job
from tests.conftest import submit_unpublished

MLP = {"kind": "train", "name": "digits-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
       "hyperparameters": {"epochs": 1}}


def job_count(settings) -> int:
    with session_scope(settings.database_url) as s:
        return s.execute(select(func.count()).select_from(Job)).scalar_one()


def test_submit_records_a_queued_job_and_answers_201(client, auth, settings):
    r = client.post("/api/v1/jobs", json=MLP, headers=auth)
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    assert body["state"] == "queued" and body["kind"] == "train" and body["name"] == "digits-mlp"
    assert r.headers["Location"] == f"/api/v1/jobs/{body['id']}"
    assert client.get(r.headers["Location"], headers=auth).get_json()["id"] == body["id"]


@pytest.mark.parametrize(
    "payload,field",
    [
        ({**MLP, "model": {"arch": "resnet50"}}, "model"),
        ({**MLP, "hyperparameters": {"epochs": -3}}, "hyperparameters.epochs"),
        ({**MLP, "dataset": {"id": "builtin:imagenet"}}, "dataset.id"),
        ({**MLP, "dataset": {"id": "builtin:digits", "target": "nope"}}, "dataset.target"),
        ({**MLP, "dataset": {"id": "builtin:digits", "window": 8}}, "dataset.window"),
        ({**MLP, "dataset": {"id": "builtin:sunspots", "features": ["x"]}}, "dataset.features"),
        ({**MLP, "dataset": {"id": "builtin:digits", "split": {"val_fraction": 0.5, "test_fraction": 0.5}}},
         "dataset.split"),
        ({**MLP, "resources": {"gpus": 4}}, "resources.gpus"),
        ({"kind": "predict", "model": "999999", "inputs": [[0.0] * 64]}, "model"),
        ({"kind": "predict", "model": "no-such-model@latest", "inputs": [[0.0] * 64]}, "model"),
        ({"kind": "predict", "model": "\u00b2", "inputs": [[0.0] * 64]}, "model"),
        ({"kind": "predict", "model": "m@\u00b2", "inputs": [[0.0] * 64]}, "model"),
        ({"kind": "predict", "model": "9" * 30, "inputs": [[0.0] * 64]}, "model"),
        ({"kind": "predict", "model": "m@" + "9" * 30, "inputs": [[0.0] * 64]}, "model"),
        ({"kind": "predict", "model": "someone@example.com/m@latest", "inputs": [[0.0] * 64]}, "model"),
        ({**MLP, "init_from": "\u0663"}, "init_from"),
        ({**MLP, "init_from": "m@" + "9" * 30}, "init_from"),
    ],
)
def test_bad_specs_answer_422_problem_json_and_create_nothing(client, auth, settings, payload, field):
    before = job_count(settings)
    r = client.post("/api/v1/jobs", json=payload, headers=auth)
    assert r.status_code == 422
    assert r.mimetype == "application/problem+json"
    body = r.get_json()
    assert body["status"] == 422 and field in body["detail"]
    assert any(e["field"] == field for e in body["errors"])
    assert job_count(settings) == before


def test_malformed_json_is_a_clear_4xx(client, auth, settings):
    before = job_count(settings)
    r = client.post("/api/v1/jobs", data="{not json", headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.mimetype == "application/problem+json"
    assert job_count(settings) == before


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer kiln_wrong"}, {"Authorization": "Basic abc"}])
def test_missing_or_wrong_token_answers_401(client, headers):
    r = client.get("/api/v1/jobs", headers=headers)
    assert r.status_code == 401 and r.mimetype == "application/problem+json"
    assert "Bearer" in r.headers["WWW-Authenticate"]
    assert client.post("/api/v1/jobs", json=MLP, headers=headers).status_code == 401


def _job_routes(app) -> list[tuple[str, str]]:
    """Every API route that takes a job id, read from the app so a new sub-route is covered too."""
    routes = []
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1/") and "job_id" in rule.arguments:
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                routes.append((method.lower(), rule.rule.replace("<int:job_id>", "{}")))
    return routes


def test_another_users_job_is_404_on_every_endpoint(app, client, make_user, settings):
    alice_id, alice = make_user()
    _, bob = make_user()
    a = {"Authorization": f"Bearer {alice}"}
    b = {"Authorization": f"Bearer {bob}"}
    job_id = submit_unpublished(settings, alice_id, MLP)  # stays queued: no worker hears of it
    missing = job_id + 10_000
    routes = _job_routes(app)
    assert {path.rsplit("/", 1)[-1] for _, path in routes} >= {"{}", "metrics", "events", "cancel", "retry", "pause",
                                                               "resume"}
    for method, path in routes:
        theirs = getattr(client, method)(path.format(job_id), headers=b)
        absent = getattr(client, method)(path.format(missing), headers=b)
        assert theirs.status_code == absent.status_code == 404, path
        assert theirs.mimetype == absent.mimetype == "application/problem+json", path
        assert theirs.get_json()["detail"].replace(str(job_id), "N") == absent.get_json()["detail"].replace(str(missing), "N")
    assert job_id not in [j["id"] for j in client.get("/api/v1/jobs", headers=b).get_json()["items"]]
    mine = client.get(f"/api/v1/jobs/{job_id}", headers=a)
    # Nothing bob sent reached the job: not paused, not cancelled.
    assert mine.status_code == 200 and mine.get_json()["state"] == "queued"
    assert mine.get_json()["cancel_requested_at"] is None and mine.get_json()["pause_requested_at"] is None


def test_admin_sees_every_job(client, make_user):
    _, alice = make_user()
    _, admin = make_user(admin=True)
    job_id = client.post("/api/v1/jobs", json=MLP, headers={"Authorization": f"Bearer {alice}"}).get_json()["id"]
    assert client.get(f"/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {admin}"}).status_code == 200


def test_list_is_newest_first_with_a_cursor(client, auth):
    ids = [client.post("/api/v1/jobs", json={**MLP, "name": f"j{i}"}, headers=auth).get_json()["id"] for i in range(5)]
    page1 = client.get("/api/v1/jobs?limit=2", headers=auth).get_json()
    assert [j["id"] for j in page1["items"]] == ids[::-1][:2]
    page2 = client.get(f"/api/v1/jobs?limit=2&cursor={page1['next_cursor']}", headers=auth).get_json()
    assert [j["id"] for j in page2["items"]] == ids[::-1][2:4]
    page3 = client.get(f"/api/v1/jobs?limit=2&cursor={page2['next_cursor']}", headers=auth).get_json()
    assert [j["id"] for j in page3["items"]] == ids[:1] and page3["next_cursor"] is None
    assert client.get("/api/v1/jobs?limit=0", headers=auth).status_code == 422
    assert client.get("/api/v1/jobs?limit=abc", headers=auth).status_code == 422


def test_cancel_of_a_queued_job_is_immediate_and_persisted(client, auth):
    job_id = client.post("/api/v1/jobs", json=MLP, headers=auth).get_json()["id"]
    r = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth)
    assert r.status_code == 202
    body = r.get_json()
    assert body["state"] == "cancelled" and body["cancel_requested_at"]
    events = client.get(f"/api/v1/jobs/{job_id}/events", headers=auth).get_json()["items"]
    assert [(e["from"], e["to"]) for e in events if e["kind"] == "state"] == [("queued", "cancelled")]
    again = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth)
    assert again.status_code == 409 and again.mimetype == "application/problem+json"


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"] == {"database": "ok", "broker": "ok"}


def test_unknown_api_route_is_problem_json(client, auth):
    r = client.get("/api/v1/nope", headers=auth)
    assert r.status_code == 404 and r.mimetype == "application/problem+json"


def test_openapi_document_describes_the_spec_without_a_token(client):
    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    assert {"TrainSpec", "PredictSpec", "JobSpec", "Problem"} <= set(schemas)
    assert set(doc["paths"]) >= {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/cancel", "/datasets"}
    arch_tags = {s["properties"]["arch"].get("const") or tuple(s["properties"]["arch"].get("enum", ()))
                 for name, s in schemas.items() if name.endswith("Config") and "arch" in s.get("properties", {})}
    assert "mlp" in arch_tags and "transformer" in arch_tags


def test_prometheus_metrics_count_jobs_by_state(client, auth):
    from prometheus_client.parser import text_string_to_metric_families

    def queued_train() -> float:
        text = client.get("/metrics").get_data(as_text=True)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        return sum(s.value for s in families["kiln_jobs"].samples
                   if s.labels == {"state": "queued", "kind": "train"})

    before = queued_train()
    client.post("/api/v1/jobs", json=MLP, headers=auth)
    assert queued_train() == before + 1
    text = client.get("/metrics").get_data(as_text=True)
    assert "kiln_queue_oldest_wait_seconds" in text and "kiln_queue_depth" in text


def test_polling_with_an_etag_answers_304_until_the_job_changes(client, auth):
    job_id = client.post("/api/v1/jobs", json=MLP, headers=auth).get_json()["id"]
    first = client.get(f"/api/v1/jobs/{job_id}", headers=auth)
    etag = first.headers["ETag"]
    again = client.get(f"/api/v1/jobs/{job_id}", headers={**auth, "If-None-Match": etag})
    assert again.status_code == 304 and again.get_data() == b""
    client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth)
    changed = client.get(f"/api/v1/jobs/{job_id}", headers={**auth, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.get_json()["state"] == "cancelled"


@pytest.mark.parametrize("payload,field", [
    ({"kind": "predict", "model": "x@latest", "inputs": [[1.0, float("nan")]]}, "inputs[0]"),
    ({**MLP, "metadata": {"score": float("inf")}}, "metadata.score"),
])
def test_nan_and_infinity_are_refused(client, auth, settings, payload, field):
    import json

    before = job_count(settings)
    body = json.dumps(payload)  # Python writes NaN/Infinity literals, which some clients send
    r = client.post("/api/v1/jobs", data=body, headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.mimetype == "application/problem+json"
    assert any(e["field"].startswith(field) for e in r.get_json()["errors"]), r.get_json()
    assert job_count(settings) == before


def test_pause_and_resume_of_a_queued_job(client, auth):
    job_id = client.post("/api/v1/jobs", json=MLP, headers=auth).get_json()["id"]
    paused = client.post(f"/api/v1/jobs/{job_id}/pause", headers=auth)
    assert paused.status_code == 202 and paused.get_json()["state"] == "paused"
    assert client.post(f"/api/v1/jobs/{job_id}/pause", headers=auth).status_code == 409
    resumed = client.post(f"/api/v1/jobs/{job_id}/resume", headers=auth)
    assert resumed.status_code == 202 and resumed.get_json()["state"] == "queued"
    assert resumed.get_json()["pause_requested_at"] is None
    assert client.post(f"/api/v1/jobs/{job_id}/resume", headers=auth).status_code == 409
