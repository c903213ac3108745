"""Dataset uploads: stored with sha256 and an inferred schema; bad data refused with the column named."""

from __future__ import annotations

import io
import json

import pytest

from app import storage

CSV = b"a,b,label,note\n" + b"".join(f"{i},{i * 2 % 7},{i % 2},n{i}\n".encode() for i in range(40))


def upload(client, auth, data: bytes, filename: str = "train.csv", **form):
    return client.post("/api/v1/datasets", headers=auth, content_type="multipart/form-data",
                       data={"file": (io.BytesIO(data), filename), **form})


def test_csv_upload_is_stored_with_sha256_and_schema(client, auth, settings):
    r = upload(client, auth, CSV)
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    assert body["id"].startswith("dataset:") and body["rows"] == 40 and body["format"] == "csv"
    cols = {c["name"]: c for c in body["schema"]["columns"]}
    assert cols["a"]["numeric"] and not cols["note"]["numeric"] and cols["label"]["distinct"] == 2
    listed = client.get("/api/v1/datasets", headers=auth).get_json()["items"]
    assert body["id"] in [d["id"] for d in listed] and "builtin:digits" in [d["id"] for d in listed]
    ds_id = int(body["id"].split(":")[1])
    from app.db import session_scope
    from app.models import Dataset

    with session_scope(settings.database_url) as s:
        row = s.get(Dataset, ds_id)
        assert storage.read_verified(settings.storage_root, row.path, body["sha256"]) == CSV


def test_jsonl_and_parquet_uploads(client, auth):
    jsonl = b"\n".join(json.dumps({"x": i, "y": i % 3}).encode() for i in range(10))
    assert upload(client, auth, jsonl, "d.jsonl").get_json()["rows"] == 10
    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame({"x": range(12), "y": [0, 1] * 6}).to_parquet(buf)
    assert upload(client, auth, buf.getvalue(), "d.parquet").get_json()["rows"] == 12


@pytest.mark.parametrize("data,filename,needle", [
    (b"", "empty.csv", "empty"),
    (b"a,b\n", "header_only.csv", "no rows"),
    (b"\x00\x01garbage", "x.parquet", "could not read"),
    (b"a,b\n1,2\n", "x.xlsx", "unsupported format"),
])
def test_bad_uploads_are_422_naming_the_problem(client, auth, data, filename, needle):
    r = upload(client, auth, data, filename)
    assert r.status_code == 422 and r.mimetype == "application/problem+json"
    assert needle in r.get_json()["detail"]


def test_upload_without_file_field_is_422(client, auth):
    r = client.post("/api/v1/datasets", headers=auth, data={})
    assert r.status_code == 422 and "file" in r.get_json()["detail"]


def test_another_users_dataset_is_404_and_unusable(client, make_user):
    _, alice = make_user()
    _, bob = make_user()
    a, b = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    ds = upload(client, a, CSV).get_json()["id"]
    assert client.get(f"/api/v1/datasets/{ds.split(':')[1]}", headers=b).status_code == 404
    spec = {"kind": "train", "name": "x", "model": {"arch": "mlp"}, "dataset": {"id": ds, "target": "label"}}
    r = client.post("/api/v1/jobs", json=spec, headers=b)
    assert r.status_code == 422 and r.get_json()["errors"][0]["field"] == "dataset.id"


@pytest.mark.parametrize("dataset,field,needle", [
    ({"target": "nope"}, "dataset.target", "'nope' is not a column"),
    ({"target": "label", "features": ["a", "zzz"]}, "dataset.features[1]", "'zzz' is not a column"),
    ({"target": "label", "features": ["a", "note"]}, "dataset.features[1]", "not numeric"),
    ({"target": "a", "task": "classification", "features": ["b"]}, None, None),
    ({"target": "b", "task": "forecasting", "window": 40}, "dataset.window", "too few"),
    ({"target": "note", "task": "regression"}, "dataset.target", "not numeric"),
    ({}, "dataset.target", "needs a target"),
])
def test_specs_referring_to_bad_columns_are_422(client, auth, dataset, field, needle):
    ds = upload(client, auth, CSV).get_json()["id"]
    spec = {"kind": "train", "name": "x", "model": {"arch": "mlp"}, "dataset": {"id": ds, **dataset}}
    r = client.post("/api/v1/jobs", json=spec, headers=auth)
    if field is None:
        assert r.status_code == 201
        return
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["errors"][0]["field"] == field and needle in r.get_json()["detail"]


def test_single_class_target_is_refused_at_submit(client, auth):
    data = b"x,y\n" + b"".join(f"{i},1\n".encode() for i in range(20))
    ds = upload(client, auth, data).get_json()["id"]
    spec = {"kind": "train", "name": "x", "model": {"arch": "mlp"},
            "dataset": {"id": ds, "target": "y", "task": "classification"}}
    r = client.post("/api/v1/jobs", json=spec, headers=auth)
    assert r.status_code == 422 and "single class" in r.get_json()["detail"]


class ProbingBody(io.BytesIO):
    """A request body that, when the server first reads it, checks that no transaction is held open.

    On PostgreSQL no connection of this database may sit idle in a transaction (the sign-in's lookup
    would, and ``idle_in_transaction_session_timeout`` ends such a connection during a long upload);
    on SQLite another writer must be able to take the write lock at once.
    """

    def __init__(self, data: bytes, database_url: str):
        super().__init__(data)
        self.database_url = database_url
        self.held: list[str] | None = None

    def _probe(self) -> None:
        if self.held is None:
            self.held = self._open_transactions()

    def read(self, size: int | None = -1) -> bytes:
        self._probe()
        return super().read(size)

    def read1(self, size: int = -1) -> bytes:
        self._probe()
        return super().read1(size)

    def readline(self, size: int | None = -1) -> bytes:
        self._probe()
        return super().readline(size)

    def readinto(self, buffer) -> int:
        self._probe()
        return super().readinto(buffer)

    def _open_transactions(self) -> list[str]:
        import sqlalchemy as sa

        if self.database_url.startswith("postgresql"):
            engine = sa.create_engine(self.database_url, poolclass=sa.pool.NullPool)
            with engine.connect() as conn:
                return [q for (q,) in conn.execute(sa.text(
                    "SELECT query FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"))]
        import sqlite3

        conn = sqlite3.connect(sa.engine.make_url(self.database_url).database, timeout=0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return []
        except sqlite3.OperationalError as exc:
            return [f"write lock held: {exc}"]
        finally:
            conn.close()


def test_no_transaction_stays_open_while_an_upload_streams_in(client, auth, settings):
    from werkzeug.datastructures import FileStorage
    from werkzeug.test import encode_multipart

    boundary, data = encode_multipart({"file": FileStorage(io.BytesIO(CSV), filename="train.csv")})
    body = ProbingBody(data, settings.database_url)
    r = client.post("/api/v1/datasets", headers=auth, content_length=len(data),
                    content_type=f"multipart/form-data; boundary={boundary}", input_stream=body)
    assert r.status_code == 201, r.get_json()
    assert body.held == [], body.held
