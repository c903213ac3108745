"""Idempotency-Key on creating POSTs: one creation per key and body, 422 for another body, 24 h expiry, races."""

from __future__ import annotations

import io
import threading
import uuid
from datetime import timedelta

from sqlalchemy import func, select, update

from app.db import session_scope
from app.models import ApiToken, Dataset, IdempotencyKey, Job, utcnow

MLP = {"kind": "train", "name": "digits-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
       "hyperparameters": {"epochs": 1}}


def count(settings, model, **where) -> int:
    with session_scope(settings.database_url) as s:
        stmt = select(func.count()).select_from(model)
        for name, value in where.items():
            stmt = stmt.where(getattr(model, name) == value)
        return s.execute(stmt).scalar_one()


def test_same_key_same_body_creates_one_job_and_answers_the_same(client, auth, settings):
    key = {"Idempotency-Key": uuid.uuid4().hex}
    before = count(settings, Job)
    first = client.post("/api/v1/jobs", json=MLP, headers={**auth, **key})
    # The same JSON with its keys in another order is the same request.
    again = client.post("/api/v1/jobs", json=dict(reversed(list(MLP.items()))), headers={**auth, **key})
    assert first.status_code == again.status_code == 201
    assert first.data == again.data and first.headers["Location"] == again.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert count(settings, Job) == before + 1
    other = client.post("/api/v1/jobs", json={**MLP, "name": "another"}, headers={**auth, **key})
    assert other.status_code == 422 and other.get_json()["type"] == "/problems/idempotency-key-reuse"
    assert count(settings, Job) == before + 1
    # Without the header every POST creates.
    client.post("/api/v1/jobs", json=MLP, headers=auth)
    assert count(settings, Job) == before + 2


def test_keys_are_per_user_and_expire_after_a_day(client, auth, make_user, settings):
    key = {"Idempotency-Key": "shared-key"}
    first = client.post("/api/v1/jobs", json=MLP, headers={**auth, **key})
    _, other = make_user()
    theirs = client.post("/api/v1/jobs", json=MLP, headers={"Authorization": f"Bearer {other}", **key})
    assert theirs.status_code == 201 and theirs.get_json()["id"] != first.get_json()["id"]
    with session_scope(settings.database_url, write=True) as s:
        s.execute(update(IdempotencyKey).where(IdempotencyKey.key == "shared-key")
                  .values(created_at=utcnow() - timedelta(hours=25)))
    later = client.post("/api/v1/jobs", json=MLP, headers={**auth, **key})
    assert later.status_code == 201 and later.get_json()["id"] != first.get_json()["id"]
    assert "Idempotent-Replayed" not in later.headers


def test_tokens_users_and_datasets_take_keys_too(client, auth, make_user, settings):
    key = {"Idempotency-Key": uuid.uuid4().hex}
    a = client.post("/api/v1/tokens", json={"name": "ci"}, headers={**auth, **key})
    b = client.post("/api/v1/tokens", json={"name": "ci"}, headers={**auth, **key})
    assert a.status_code == b.status_code == 201 and a.get_json()["id"] == b.get_json()["id"]
    _, admin = make_user(admin=True)
    admin_auth = {"Authorization": f"Bearer {admin}", **key}
    email = f"n{uuid.uuid4().hex[:8]}@example.com"
    a = client.post("/api/v1/users", json={"email": email, "role": "user"}, headers=admin_auth)
    b = client.post("/api/v1/users", json={"email": email, "role": "user"}, headers=admin_auth)
    assert a.status_code == b.status_code == 201 and a.data == b.data
    csv = b"a,b\n" + b"".join(f"{i},{i % 2}\n".encode() for i in range(50))
    before = count(settings, Dataset)
    # A key names one request: the token's key sent with an upload is another request's key.
    assert client.post("/api/v1/datasets", headers={**auth, **key}, content_type="multipart/form-data",
                       data={"file": (io.BytesIO(csv), "d.csv")}).status_code == 422
    key = {"Idempotency-Key": uuid.uuid4().hex}

    def upload(data: bytes, name: str = "d"):
        return client.post("/api/v1/datasets", headers={**auth, **key}, content_type="multipart/form-data",
                           data={"file": (io.BytesIO(data), "d.csv"), "name": name})

    a, b = upload(csv), upload(csv)
    assert a.status_code == b.status_code == 201 and a.data == b.data and count(settings, Dataset) == before + 1
    assert upload(csv + b"9,1\n").status_code == 422 and upload(csv, name="other").status_code == 422
    assert count(settings, Dataset) == before + 1


def test_concurrent_requests_with_one_key_create_one_job(app, auth, settings):
    key = {"Idempotency-Key": uuid.uuid4().hex}
    before = count(settings, Job)
    answers = []
    start = threading.Barrier(4)

    def post():
        client = app.test_client()
        start.wait()
        r = client.post("/api/v1/jobs", json=MLP, headers={**auth, **key})
        answers.append((r.status_code, r.get_json()))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert count(settings, Job) == before + 1
    created = {body["id"] for status, body in answers if status == 201}
    assert len(created) == 1
    # A loser either got the same answer or was told the first is still in progress.
    assert all(status == 201 or (status == 409 and body["type"] == "/problems/idempotency-key-in-progress")
               for status, body in answers)
