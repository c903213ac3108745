"""Tenants are apart: every API route that takes an id or a name answers another user's resource
exactly as it answers a missing one, and changes nothing."""

from __future__ import annotations

import io
import re

from sqlalchemy import select

from app.db import session_scope
from app.models import ApiToken, Checkpoint, Job, ModelVersion
from tests.conftest import submit_unpublished
from tests.web.test_openapi import _add_history

MLP = {"kind": "train", "name": "tenant-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:iris"}}
# What each path parameter is for alice's resources, and for resources that do not exist.
MISSING = {"job_id": "987654", "checkpoint_id": "987655", "dataset_id": "987656", "token_id": "987657",
           "user_id": "987658", "name": "no-such-model", "number": "1", "alias": "production",
           "ref": "no-such-model@1"}


def api_routes(app) -> list[tuple[str, str]]:
    """Every (method, rule) under /api/v1 with a path parameter, read from the app: new routes are walked too."""
    return sorted((method, rule.rule) for rule in app.url_map.iter_rules()
                  if rule.rule.startswith("/api/v1/") and rule.arguments
                  for method in rule.methods - {"HEAD", "OPTIONS"})


def fill(rule: str, values: dict[str, str]) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", lambda m: values[m.group(1)], rule)


def test_every_route_answers_another_users_resource_as_a_missing_one(app, client, make_user, settings):
    alice_id, alice = make_user()
    _, bob = make_user()
    a, b = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    job_id = submit_unpublished(settings, alice_id, MLP)  # stays queued: no worker hears of it
    _add_history(settings, job_id, alice_id)
    upload = client.post("/api/v1/datasets", headers=a, content_type="multipart/form-data",
                         data={"file": (io.BytesIO(b"a,b,label\n1,2,x\n3,4,y\n"), "t.csv")})
    with session_scope(settings.database_url) as s:
        checkpoint = s.execute(select(Checkpoint.id).where(Checkpoint.job_id == job_id)).scalar_one()
        model = s.execute(select(ModelVersion.name).where(ModelVersion.job_id == job_id)).scalar_one()
        token = s.execute(select(ApiToken.id).where(ApiToken.user_id == alice_id)).scalar()
    theirs = {"job_id": str(job_id), "checkpoint_id": str(checkpoint), "token_id": str(token),
              "dataset_id": upload.get_json()["id"].split(":")[1], "user_id": str(alice_id), "name": model,
              "number": "1", "alias": "production", "ref": f"{model}@1"}
    bodies = {"PUT": {"version": 1}, "POST": {"inputs": [[1, 2, 3, 4]]}, "PATCH": {"role": "admin"}}
    routes = api_routes(app)
    assert len(routes) >= 20
    for method, rule in routes:
        kwargs = {"headers": b, "json": bodies[method]} if method in bodies else {"headers": b}
        other = client.open(fill(rule, theirs), method=method, **kwargs)
        absent = client.open(fill(rule, MISSING), method=method, **kwargs)
        assert other.status_code == absent.status_code, (method, rule, other.status_code, absent.status_code)
        # A model reference names a model, so a predict spec answers 422 for it; everything else is 404.
        assert other.status_code == (422 if rule.endswith("/predict") else 404), (method, rule, other.status_code)
        assert other.mimetype == absent.mimetype == "application/problem+json", (method, rule)
        # The same bytes, but for the ids and the model name that the path itself carries.
        mine = re.sub(r"\d+", "N", other.get_data(as_text=True).replace(model, MISSING["name"]))
        gone = re.sub(r"\d+", "N", absent.get_data(as_text=True))
        assert mine == gone, (method, rule, mine, gone)
    # Nothing bob sent reached alice's things.
    job = client.get(f"/api/v1/jobs/{job_id}", headers=a).get_json()
    assert job["state"] == "queued" and job["cancel_requested_at"] is None and job["pause_requested_at"] is None
    assert client.get(f"/api/v1/models/{model}", headers=a).get_json()["aliases"].get("production") is None
    assert client.get(f"/api/v1/datasets/{theirs['dataset_id']}", headers=a).status_code == 200
    assert client.get("/api/v1/jobs", headers=a).status_code == 200  # alice's token still works
    with session_scope(settings.database_url) as s:
        assert s.get(Job, job_id).owner_id == alice_id
