"""The model registry through the API: aliases move what answers, deletion is guarded, lineage and input schemas are stored."""

from __future__ import annotations

import uuid

import pytest

from app.db import session_scope
from app.models import Checkpoint, JobEvent, ModelVersion
from tests.conftest import run_inline
from tests.web.test_pages import PASSWORD, csrf_token, person, sign_in  # noqa: F401 - person is a fixture

IRIS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


def _run(settings, job_id: int) -> None:
    assert run_inline(settings, job_id) == "succeeded"


def _train(client, auth, settings, name: str, seed: int = 0, **extra) -> dict:
    spec = {"kind": "train", "name": name, "model": {"arch": "mlp", "hidden_sizes": [8]},
            "dataset": {"id": "builtin:iris"}, "hyperparameters": {"epochs": 2, "seed": seed, "learning_rate": 0.05},
            **extra}
    r = client.post("/api/v1/jobs", json=spec, headers=auth)
    assert r.status_code == 201, r.get_json()
    _run(settings, r.get_json()["id"])
    return client.get(f"/api/v1/jobs/{r.get_json()['id']}", headers=auth).get_json()


def _predict(client, auth, settings, model: str, inputs=IRIS, **extra) -> dict:
    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": model, "inputs": inputs, **extra}, headers=auth)
    assert r.status_code == 201, r.get_json()
    _run(settings, r.get_json()["id"])
    return client.get(f"/api/v1/jobs/{r.get_json()['id']}", headers=auth).get_json()["result"]


@pytest.fixture
def two_versions(client, auth, settings) -> str:
    """A model name with versions 1 and 2, trained tiny with different seeds."""
    name = f"reg-{uuid.uuid4().hex[:8]}"
    _train(client, auth, settings, name, seed=0)
    _train(client, auth, settings, name, seed=1)
    return name


def test_moving_production_changes_which_version_answers(client, auth, settings, two_versions):
    name = two_versions
    r = client.put(f"/api/v1/models/{name}/aliases/production", json={"version": 1}, headers=auth)
    assert r.status_code == 200 and r.get_json()["aliases"] == {"latest": 2, "production": 1}
    first = _predict(client, auth, settings, f"{name}@production")
    assert first["model"] == f"{name}@1"

    r = client.put(f"/api/v1/models/{name}/aliases/production", json={"version": 2}, headers=auth)
    assert r.status_code == 200
    second = _predict(client, auth, settings, f"{name}@production")
    assert second["model"] == f"{name}@2"
    assert [p["probabilities"] for p in first["predictions"]] != [p["probabilities"] for p in second["predictions"]]
    # The same answer as naming the version itself.
    assert _predict(client, auth, settings, f"{name}@2")["predictions"] == second["predictions"]

    listing = client.get(f"/api/v1/models/{name}", headers=auth).get_json()
    assert [v["version"] for v in listing["versions"]] == [2, 1]
    assert listing["versions"][0]["aliases"] == ["latest", "production"]

    assert client.delete(f"/api/v1/models/{name}/aliases/production", headers=auth).status_code == 204
    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": f"{name}@production", "inputs": IRIS},
                    headers=auth)
    assert r.status_code == 422 and "no alias 'production'" in r.get_json()["detail"]


@pytest.mark.parametrize("alias", ["latest", "3", "-x", "a b"])
def test_reserved_or_malformed_aliases_are_refused(client, auth, two_versions, alias):
    r = client.put(f"/api/v1/models/{two_versions}/aliases/{alias}", json={"version": 1}, headers=auth)
    assert r.status_code == 422
    r = client.put(f"/api/v1/models/{two_versions}/aliases/staging", json={"version": 9}, headers=auth)
    assert r.status_code == 404
    r = client.put(f"/api/v1/models/{two_versions}/aliases/staging", json={"version": "1"}, headers=auth)
    assert r.status_code == 422


def test_another_users_model_is_not_found_and_viewers_cannot_move_aliases(client, auth, make_user, two_versions):
    _, other = make_user()
    headers = {"Authorization": f"Bearer {other}"}
    assert client.get(f"/api/v1/models/{two_versions}", headers=headers).status_code == 404
    r = client.put(f"/api/v1/models/{two_versions}/aliases/production", json={"version": 1}, headers=headers)
    assert r.status_code == 404


def test_deleting_a_version_is_guarded_and_a_deleted_version_is_refused(client, auth, settings, two_versions):
    name = two_versions
    # A queued prediction uses version 1: 409.
    queued = client.post("/api/v1/jobs", json={"kind": "predict", "model": f"{name}@1", "inputs": IRIS}, headers=auth)
    assert queued.status_code == 201
    r = client.delete(f"/api/v1/models/{name}/versions/1", headers=auth)
    assert r.status_code == 409 and str(queued.get_json()["id"]) in r.get_json()["detail"]
    _run(settings, queued.get_json()["id"])
    # An alias points at it: 409.
    client.put(f"/api/v1/models/{name}/aliases/staging", json={"version": 1}, headers=auth)
    r = client.delete(f"/api/v1/models/{name}/versions/1", headers=auth)
    assert r.status_code == 409 and "staging" in r.get_json()["detail"]
    client.put(f"/api/v1/models/{name}/aliases/staging", json={"version": 2}, headers=auth)

    assert client.delete(f"/api/v1/models/{name}/versions/1", headers=auth).status_code == 204
    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": f"{name}@1", "inputs": IRIS}, headers=auth)
    assert r.status_code == 422 and "was deleted" in r.get_json()["detail"]
    assert client.get(f"/api/v1/models/{name}/versions/1", headers=auth).status_code == 404
    assert [v["version"] for v in client.get(f"/api/v1/models/{name}", headers=auth).get_json()["versions"]] == [2]
    # A new version never reuses a deleted number, so name@N always meant one set of weights.
    job = _train(client, auth, settings, name, seed=2)
    assert job["result"]["model"] == f"{name}@3"


def test_a_fine_tuned_version_records_its_lineage_and_input_schema(client, auth, settings):
    base = f"base-{uuid.uuid4().hex[:8]}"
    _train(client, auth, settings, base)
    tuned = f"tuned-{uuid.uuid4().hex[:8]}"
    _train(client, auth, settings, tuned, init_from=f"{base}@latest")
    version = client.get(f"/api/v1/models/{tuned}", headers=auth).get_json()["versions"][0]
    with session_scope(settings.database_url) as s:
        base_row = s.query(ModelVersion).filter_by(name=base).one()
        base_sha = s.get(Checkpoint, base_row.checkpoint_id).sha256
    lineage = version["lineage"]
    assert lineage["base"] == {"id": base_row.id, "ref": f"{base}@1", "checkpoint_sha256": base_sha}
    assert lineage["dataset"] == {"id": "builtin:iris", "sha256": None}
    assert lineage["spec"]["init_from"] == f"{base}@latest" and lineage["spec"]["name"] == tuned
    assert version["input_schema"]["kind"] == "numbers" and version["input_schema"]["width"] == 4
    assert "base" not in client.get(f"/api/v1/models/{base}", headers=auth).get_json()["versions"][0]["lineage"]


@pytest.mark.parametrize("inputs, field, message", [
    ([[1, 2, 3, 4]] * 3 + [[1, 2, "x", 4]], "inputs[3][2]", 'expected a number, got "x"'),
    ([[1, 2, 3, True]], "inputs[0][3]", "expected a number, got true"),
    ([[1, 2, 3, None]], "inputs[0][3]", "expected a number, got null"),
    ([[1, 2, 3]], "inputs[0]", "has 3 values"),
    (["four numbers"], "inputs[0]", "expected a list of 4 numbers"),
])
def test_input_schema_errors_name_the_row_and_field(client, auth, two_versions, inputs, field, message):
    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": f"{two_versions}@1", "inputs": inputs},
                    headers=auth)
    assert r.status_code == 422, r.get_json()
    body = r.get_json()
    assert any(e["field"] == field and message in e["message"] for e in body["errors"]), body
    assert f"{field}: " in body["detail"] or field in body["detail"]


def test_an_explanation_the_model_cannot_give_answers_422_and_one_it_can_is_returned(client, auth, settings,
                                                                                     two_versions):
    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": f"{two_versions}@1", "inputs": IRIS,
                                          "explain": {"method": "attention"}}, headers=auth)
    assert r.status_code == 422
    assert "mlp" in r.get_json()["detail"] and "attention" in r.get_json()["detail"]
    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": f"{two_versions}@1", "inputs": IRIS * 40,
                                          "explain": True}, headers=auth)
    assert r.status_code == 422 and "at most 100 inputs" in r.get_json()["detail"]
    result = _predict(client, auth, settings, f"{two_versions}@1", explain=True)
    for p in result["predictions"]:
        e = p["explanation"]
        assert e["method"] == "integrated_gradients" and len(e["attributions"]) == 4
        assert e["completeness_error"] <= 1e-2 * max(1.0, abs(e["output_difference"]))


def test_the_pages_move_aliases_delete_versions_and_draw_explanations_as_a_heat_map(client, settings, person):
    email, headers = person()
    name = f"page-{uuid.uuid4().hex[:8]}"
    _train(client, headers, settings, name, seed=0)
    _train(client, headers, settings, name, seed=1)
    assert sign_in(client, email, PASSWORD).status_code in (302, 303)
    page = client.get("/models").get_data(as_text=True)
    token = csrf_token(page)
    assert client.post(f"/models/{name}/aliases", data={"alias": "production", "version": "1"}).status_code == 400
    moved = client.post(f"/models/{name}/aliases", data={"csrf_token": token, "alias": "production", "version": "1"},
                        follow_redirects=True)
    assert f"{name}@production now names {name}@1." in moved.get_data(as_text=True)
    assert client.get(f"/api/v1/models/{name}", headers=headers).get_json()["aliases"]["production"] == 1
    refused = client.post(f"/models/{name}/versions/1/delete", data={"csrf_token": token}, follow_redirects=True)
    assert "alias production" in refused.get_data(as_text=True)
    deleted = client.post(f"/models/{name}/versions/2/delete", data={"csrf_token": token}, follow_redirects=True)
    assert f"{name}@2 deleted." in deleted.get_data(as_text=True)

    r = client.post("/api/v1/jobs", json={"kind": "predict", "model": f"{name}@production", "inputs": IRIS[:1],
                                          "explain": {"steps": 32}}, headers=headers)
    _run(settings, r.get_json()["id"])
    html = client.get(f"/jobs/{r.get_json()['id']}").get_data(as_text=True)
    assert 'class="heatmap"' in html and "completeness error" in html
    assert html.count("background-color: rgba(") == 4  # one cell per iris feature



def _batch_size(settings, job_id: int) -> int:
    """How many jobs ran in the forward pass of ``job_id`` (its ``batched`` event)."""
    with session_scope(settings.database_url) as s:
        (event,) = s.query(JobEvent).filter_by(job_id=job_id, kind="batched").all()
        return event.data["batch_size"]


def _queue(client, auth, model: str, count: int) -> list[int]:
    ids = []
    for _ in range(count):
        r = client.post("/api/v1/jobs", json={"kind": "predict", "model": model, "inputs": IRIS[:1]}, headers=auth)
        assert r.status_code == 201, r.get_json()
        ids.append(r.get_json()["id"])
    return ids


@pytest.mark.parametrize("body, field", [
    ({"max_batch_size": 0}, "max_batch_size"), ({"max_batch_size": 1025}, "max_batch_size"),
    ({"max_batch_size": True}, "max_batch_size"), ({"max_batch_size": "4"}, "max_batch_size"),
    ({"max_delay_ms": -1}, "max_delay_ms"), ({"max_delay_ms": 1001}, "max_delay_ms"),
    ({"max_delay_ms": 2.5}, "max_delay_ms"), ({"batch": 4}, "batch"), ([4], "(body)"),
])
def test_bad_serving_settings_answer_422_naming_the_field(client, auth, two_versions, body, field):
    r = client.put(f"/api/v1/models/{two_versions}/versions/1/serving", json=body, headers=auth)
    assert r.status_code == 422 and r.mimetype == "application/problem+json", r.get_json()
    assert [e["field"] for e in r.get_json()["errors"]] == [field]
    wrapped = {"serving": body} if isinstance(body, dict) else {"serving": 4}
    r = client.put(f"/api/v1/models/{two_versions}/aliases/production", json={"version": 1, **wrapped}, headers=auth)
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["errors"][0]["field"].startswith("serving")
    # Nothing was half-written: the version keeps the global settings, the alias was not created.
    model = client.get(f"/api/v1/models/{two_versions}", headers=auth).get_json()
    assert model["versions"][1]["serving"] == {"max_batch_size": None, "max_delay_ms": None}
    assert "production" not in model["aliases"]


def test_a_versions_and_an_aliass_batch_limits_override_the_global_one(client, auth, settings, two_versions):
    name = two_versions
    assert settings.predict_max_batch_size > 4  # the global limit would put every queued job in one batch
    assert client.put(f"/api/v1/models/{name}/versions/9/serving", json={}, headers=auth).status_code == 404
    r = client.put(f"/api/v1/models/{name}/versions/1/serving", json={"max_batch_size": 2, "max_delay_ms": 0},
                   headers=auth)
    assert r.status_code == 200 and r.get_json()["serving"] == {"max_batch_size": 2, "max_delay_ms": 0}
    ids = _queue(client, auth, f"{name}@1", 5)
    _run(settings, ids[0])
    assert _batch_size(settings, ids[0]) == 2  # the version's limit, not the global 32
    for job_id in ids[2:]:
        _run(settings, job_id)

    # An alias's own limit wins for predictions that name the alias; moving it keeps its settings.
    r = client.put(f"/api/v1/models/{name}/aliases/production",
                   json={"version": 2, "serving": {"max_batch_size": 3, "warm": True}}, headers=auth)
    assert r.status_code == 200
    r = client.put(f"/api/v1/models/{name}/aliases/production", json={"version": 1}, headers=auth)
    assert r.get_json()["alias_serving"] == {"production": {"max_batch_size": 3, "max_delay_ms": None, "warm": True}}
    ids = _queue(client, auth, f"{name}@production", 4)
    _run(settings, ids[0])
    assert _batch_size(settings, ids[0]) == 3
    ids += _queue(client, auth, f"{name}@1", 3)
    _run(settings, ids[-3])  # named by number: the version's limit (2), with the oldest queued job
    assert _batch_size(settings, ids[-3]) == 2
    for job_id in ids:
        _run(settings, job_id)

    # Null limits give the global settings back.
    r = client.put(f"/api/v1/models/{name}/versions/1/serving", json={"max_batch_size": None}, headers=auth)
    assert r.get_json()["serving"] == {"max_batch_size": None, "max_delay_ms": None}


def test_the_models_page_sets_batching_and_warm_aliases(client, settings, person):
    email, headers = person()
    name = f"page-{uuid.uuid4().hex[:8]}"
    _train(client, headers, settings, name)
    assert sign_in(client, email, PASSWORD).status_code in (302, 303)
    token = csrf_token(client.get("/models").get_data(as_text=True))
    saved = client.post(f"/models/{name}/versions/1/serving", follow_redirects=True,
                        data={"csrf_token": token, "max_batch_size": "8", "max_delay_ms": ""})
    assert f"Batching of {name}@1 saved." in saved.get_data(as_text=True)
    assert "at most 8 per forward pass, waiting at most the global ms" in saved.get_data(as_text=True)
    refused = client.post(f"/models/{name}/versions/1/serving", follow_redirects=True,
                          data={"csrf_token": token, "max_batch_size": "0", "max_delay_ms": "x"})
    assert refused.status_code == 200 and "max_batch_size: Input should be greater than or equal to 1" in \
        refused.get_data(as_text=True)
    warm = client.post(f"/models/{name}/aliases", follow_redirects=True,
                       data={"csrf_token": token, "alias": "production", "version": "1", "warm": "on"})
    assert "production (loaded at worker start)" in warm.get_data(as_text=True)
    model = client.get(f"/api/v1/models/{name}", headers=headers).get_json()
    assert model["versions"][0]["serving"] == {"max_batch_size": 8, "max_delay_ms": None}
    assert model["alias_serving"]["production"]["warm"] is True
