"""JSON body limit apart from the upload limit; per-user quotas on active jobs, compute per day and storage."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest

from app.db import session_scope
from app.models import Attempt, Job, utcnow

MLP = {"kind": "train", "name": "digits-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
       "hyperparameters": {"epochs": 1}}
JSON_LIMIT = 2048


@pytest.fixture(scope="module")
def limited(settings):
    """An app with a small JSON limit and small quotas (publishing to an unconsumed Redis database)."""
    from app import create_app

    app = create_app({
        "TESTING": True, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url.rsplit("/", 1)[0] + "/13",
        "STORAGE_ROOT": settings.storage_root, "MAX_JSON_BYTES": JSON_LIMIT, "QUOTA_ACTIVE_JOBS": 2,
        "QUOTA_COMPUTE_SECONDS_PER_DAY": 3600, "QUOTA_STORAGE_BYTES": 10_000,
    })
    return app.test_client()


def upload(client, auth, data: bytes):
    return client.post("/api/v1/datasets", headers=auth, content_type="multipart/form-data",
                       data={"file": (io.BytesIO(data), "d.csv")})


def test_a_json_body_over_its_limit_is_413_while_an_upload_that_size_is_accepted(limited, auth):
    big = {**MLP, "metadata": {f"k{i}": "x" * 60 for i in range(50)}}  # about 4 KB of JSON
    r = limited.post("/api/v1/jobs", json=big, headers=auth)
    assert r.status_code == 413 and r.mimetype == "application/problem+json"
    assert r.get_json()["type"] == "/problems/payload-too-large" and str(JSON_LIMIT) in r.get_json()["detail"]
    csv = b"a,b\n" + b"".join(f"{i},{i % 3}\n".encode() for i in range(1000))
    assert len(csv) > JSON_LIMIT
    assert upload(limited, auth, csv).status_code == 201


def test_active_jobs_quota_answers_429_naming_it(limited, auth):
    for _ in range(2):
        assert limited.post("/api/v1/jobs", json=MLP, headers=auth).status_code == 201
    r = limited.post("/api/v1/jobs", json=MLP, headers=auth)
    assert r.status_code == 429 and r.mimetype == "application/problem+json"
    body = r.get_json()
    assert body["type"] == "/problems/quota-exceeded" and body["quota"] == "active_jobs"
    assert body["limit"] == 2 and body["used"] == 2
    # Ending one frees a place.
    first = limited.get("/api/v1/jobs", headers=auth).get_json()["items"][0]["id"]
    limited.post(f"/api/v1/jobs/{first}/cancel", headers=auth)
    assert limited.post("/api/v1/jobs", json=MLP, headers=auth).status_code == 201


def test_compute_quota_answers_429_with_todays_use(limited, auth, settings):
    r = limited.post("/api/v1/jobs", json=MLP, headers=auth)
    job_id = r.get_json()["id"]
    limited.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth)
    now = utcnow()
    start = max(now - timedelta(seconds=4000), now.replace(hour=0, minute=0, second=0, microsecond=0))
    with session_scope(settings.database_url, write=True) as s:
        s.add(Attempt(job_id=job_id, number=1, worker="w", host="h", pid=1, started_at=start,
                      ended_at=start + timedelta(seconds=min(3700, (now - start).total_seconds()))))
    used = min(3700, (now - start).total_seconds())
    r = limited.post("/api/v1/jobs", json=MLP, headers=auth)
    if used >= 3600:
        assert r.status_code == 429
        body = r.get_json()
        assert body["quota"] == "compute_seconds_per_day" and body["limit"] == 3600 and body["used"] >= 3600
    else:  # just after midnight UTC there is not an hour of today to spend yet
        assert r.status_code == 201


def test_storage_quota_answers_413_naming_it(limited, auth):
    first = b"a,b\n" + b"1,2\n" * 1500  # 6 KB of the 10 KB
    assert upload(limited, auth, first).status_code == 201
    r = upload(limited, auth, first)
    assert r.status_code == 413 and r.get_json()["type"] == "/problems/storage-quota-exceeded"
    body = r.get_json()
    assert body["quota"] == "storage_bytes" and body["limit"] == 10_000 and body["used"] == len(first)
