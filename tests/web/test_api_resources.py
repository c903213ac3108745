"""The API's job filters, metrics since, checkpoints (list, download), log (tail, follow) and usage."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from datetime import timedelta

from sqlalchemy import update

from app import storage
from app.db import session_scope
from app.jobs import service
from app.models import Attempt, Checkpoint, Job, JobEvent, Metric, User, utcnow

MLP = {"kind": "train", "name": "digits-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
       "hyperparameters": {"epochs": 1}}


def submit(client, auth, **changes) -> int:
    r = client.post("/api/v1/jobs", json={**MLP, **changes}, headers=auth)
    assert r.status_code == 201, r.get_json()
    return r.get_json()["id"]


def ids(client, auth, query: str) -> list[int]:
    r = client.get(f"/api/v1/jobs?{query}", headers=auth)
    assert r.status_code == 200, r.get_json()
    return [j["id"] for j in r.get_json()["items"]]


def test_jobs_filter_by_state_kind_name_and_metadata(client, auth, settings):
    a = submit(client, auth, name="Sunspots-LSTM", metadata={"team": "forecasting", "run": 3})
    b = submit(client, auth, name="digits_mlp", metadata={"team": "vision"})
    c = submit(client, auth, name="other-100", metadata={"team": "forecasting"})
    client.post(f"/api/v1/jobs/{c}/cancel", headers=auth)
    assert ids(client, auth, "state=queued") == [b, a]
    assert ids(client, auth, "state=cancelled") == [c]
    assert ids(client, auth, "kind=train") == [c, b, a] and ids(client, auth, "kind=predict") == []
    assert ids(client, auth, "name=lstm") == [a]  # substring, any case
    assert ids(client, auth, "name=S-L") == [a]
    assert ids(client, auth, "name=_") == [b]  # "_" is a character, not a LIKE wildcard
    assert ids(client, auth, "metadata.team=forecasting") == [c, a]
    assert ids(client, auth, "metadata.team=forecasting&metadata.run=3") == [a]
    assert ids(client, auth, "metadata.team=vision&state=queued") == [b]
    assert ids(client, auth, "metadata.nope=x") == []
    # Filters and the cursor compose: page through the forecasting jobs one at a time.
    first = client.get("/api/v1/jobs?metadata.team=forecasting&limit=1", headers=auth).get_json()
    assert [j["id"] for j in first["items"]] == [c]
    assert ids(client, auth, f"metadata.team=forecasting&limit=1&cursor={first['next_cursor']}") == [a]
    r = client.get("/api/v1/jobs?metadata.te%22am=x", headers=auth)
    assert r.status_code == 422 and r.get_json()["errors"][0]["field"] == "metadata.te\"am"


def test_jobs_filter_by_times_and_bad_times_answer_422(client, auth, settings):
    old, new = submit(client, auth), submit(client, auth)
    past = utcnow() - timedelta(days=3)
    with session_scope(settings.database_url, write=True) as s:
        s.execute(update(Job).where(Job.id == old).values(created_at=past, updated_at=past))
    mid = (utcnow() - timedelta(days=1)).isoformat()
    assert ids(client, auth, f"created_after={mid}") == [new]
    assert ids(client, auth, f"created_before={mid}") == [old]
    assert ids(client, auth, f"updated_after={mid}") == [new]
    assert ids(client, auth, "created_after=2000-01-01T00:00:00Z") == [new, old]
    # Unchanged listing answers 304 to a poll with its ETag, filters included.
    r = client.get(f"/api/v1/jobs?created_after={mid}", headers=auth)
    again = client.get(f"/api/v1/jobs?created_after={mid}", headers={**auth, "If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304
    for param in ("created_after", "created_before", "updated_after"):
        r = client.get(f"/api/v1/jobs?{param}=yesterday", headers=auth)
        assert r.status_code == 422 and r.mimetype == "application/problem+json"
        assert r.get_json()["errors"][0]["field"] == param


def test_metrics_since_starts_at_a_time(client, auth, settings):
    job_id = submit(client, auth)
    now = utcnow()
    with session_scope(settings.database_url, write=True) as s:
        for i, age in enumerate((300, 200, 10)):
            s.add(Metric(job_id=job_id, attempt=1, scope="epoch", epoch=i + 1, step=i + 1,
                         values={"loss": float(i)}, at=now - timedelta(seconds=age)))
    since = (now - timedelta(seconds=250)).isoformat()
    r = client.get(f"/api/v1/jobs/{job_id}/metrics", query_string={"since": since}, headers=auth)
    assert [m["epoch"] for m in r.get_json()["items"]] == [2, 3]
    assert len(client.get(f"/api/v1/jobs/{job_id}/metrics", headers=auth).get_json()["items"]) == 3
    r = client.get(f"/api/v1/jobs/{job_id}/metrics?since=12:00", headers=auth)
    assert r.status_code == 422 and r.get_json()["errors"][0]["field"] == "since"


def add_checkpoint(settings, job_id: int, data: bytes) -> int:
    relative = f"checkpoints/{job_id}/test-{os.urandom(4).hex()}.safetensors"
    size, digest = storage.write_atomic(settings.storage_root, relative, data)
    with session_scope(settings.database_url, write=True) as s:
        ckpt = Checkpoint(job_id=job_id, attempt=1, epoch=1, step=10, path=relative, size_bytes=size, sha256=digest)
        s.add(ckpt)
        s.flush()
        return ckpt.id


def test_checkpoints_list_and_download_with_digest(client, auth, make_user, settings):
    job_id = submit(client, auth)
    data = os.urandom(300_000)
    cid = add_checkpoint(settings, job_id, data)
    listed = client.get(f"/api/v1/jobs/{job_id}/checkpoints", headers=auth).get_json()["items"]
    assert [c["id"] for c in listed] == [cid] and listed[0]["size_bytes"] == len(data)
    r = client.get(listed[0]["download"], headers=auth)
    assert r.status_code == 200 and r.data == data
    assert int(r.headers["Content-Length"]) == len(data)
    assert r.headers["Repr-Digest"] == f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"
    assert r.headers["Content-Disposition"].startswith("attachment")
    _, other = make_user()
    other_auth = {"Authorization": f"Bearer {other}"}
    missing = client.get(f"/api/v1/jobs/{job_id}/checkpoints/{cid + 10_000}/download", headers=auth)
    for url in (f"/api/v1/jobs/{job_id}/checkpoints/{cid}/download", f"/api/v1/jobs/{job_id}/checkpoints"):
        r = client.get(url, headers=other_auth)
        assert r.status_code == 404 and r.get_json()["type"] == missing.get_json()["type"] == "/problems/not-found"
    # A checkpoint id of another job is not found under this one.
    second = submit(client, auth)
    assert client.get(f"/api/v1/jobs/{second}/checkpoints/{cid}/download", headers=auth).status_code == 404


def test_logs_tail_renders_events_as_lines(client, auth, settings):
    job_id = submit(client, auth)
    with session_scope(settings.database_url, write=True) as s:
        for i in range(5):
            s.add(JobEvent(job_id=job_id, kind="note", attempt=1, message=f"line {i}"))
        s.add(JobEvent(job_id=job_id, kind="traceback", attempt=1, message="secret path"))
    items = client.get(f"/api/v1/jobs/{job_id}/logs", headers=auth).get_json()["items"]
    assert [i["message"] for i in items] == ["train job submitted"] + [f"line {i}" for i in range(5)]
    tail = client.get(f"/api/v1/jobs/{job_id}/logs?tail=2", headers=auth).get_json()["items"]
    assert [i["message"] for i in tail] == ["line 3", "line 4"]
    assert tail[0]["level"] == "INFO" and tail[0]["attempt"] == 1 and "attempt=1 note: line 3" in tail[0]["text"]
    assert client.get(f"/api/v1/jobs/{job_id}/logs?tail=0", headers=auth).status_code == 422


def test_logs_follow_streams_lines_until_the_job_ends(client, auth, settings):
    job_id = submit(client, auth)
    user_id = client.get("/api/v1/usage", headers=auth).get_json()["users"][0]["user_id"]

    def write_events():
        for i in range(3):
            time.sleep(1.5)
            with session_scope(settings.database_url, write=True) as s:
                s.add(JobEvent(job_id=job_id, kind="progress", attempt=1, message=f"epoch {i} done"))
        time.sleep(1.5)
        with session_scope(settings.database_url, write=True) as s:
            service.cancel(session=s, user=s.get(User, user_id), job_id=job_id)

    writer = threading.Thread(target=write_events)
    started = time.monotonic()
    writer.start()
    r = client.get(f"/api/v1/jobs/{job_id}/logs?follow=true", headers=auth, buffered=False)
    assert r.mimetype == "text/event-stream"
    received, seen_at = [], []
    for chunk in r.response:
        text = chunk.decode()
        received.append(text)
        if "epoch 0 done" in text:
            seen_at.append(time.monotonic())
    writer.join()
    body = "".join(received)
    # Lines arrived while the writer still ran (not all at the end), in order, then the end event.
    assert seen_at and seen_at[0] - started < 60
    assert body.index("train job submitted") < body.index("epoch 0 done") < body.index("epoch 2 done")
    assert "cancelled before it ran" in body and body.rstrip().endswith("data: the job has ended")
    # With Accept: text/event-stream on an ended job: the remaining lines, then the end.
    last = client.get(f"/api/v1/jobs/{job_id}/logs?tail=1", headers=auth).get_json()["items"][0]["id"]
    r = client.get(f"/api/v1/jobs/{job_id}/logs", headers={**auth, "Accept": "text/event-stream",
                                                             "Last-Event-ID": str(last - 1)})
    assert r.get_data(as_text=True).count("event: log") == 1 and "event: end" in r.get_data(as_text=True)


def test_usage_counts_compute_jobs_and_storage(client, auth, make_user, settings):
    job_id = submit(client, auth)
    data = os.urandom(1000)
    add_checkpoint(settings, job_id, data)
    now = utcnow()
    with session_scope(settings.database_url, write=True) as s:
        s.add(Attempt(job_id=job_id, number=1, worker="w", host="h", pid=1, device="cpu",
                      started_at=now - timedelta(seconds=600), ended_at=now - timedelta(seconds=300)))
        # A second attempt on a GPU worker: its run time is GPU time.
        s.add(Attempt(job_id=job_id, number=2, worker="g", host="h", pid=2, device="cuda",
                      started_at=now - timedelta(seconds=250), ended_at=now - timedelta(seconds=50)))
    body = client.get("/api/v1/usage", headers=auth).get_json()
    [me] = body["users"]
    assert me["jobs"] == 1 and abs(me["cpu_seconds"] - 300) < 1 and abs(me["gpu_seconds"] - 200) < 1
    assert abs(me["per_job"][0]["gpu_seconds"] - 200) < 1
    assert me["storage_bytes"]["checkpoints"] == 1000 and me["per_job"][0]["checkpoint_bytes"] == 1000
    # Only the part of the attempt inside the range counts.
    frm = (now - timedelta(seconds=400)).isoformat()
    part = client.get("/api/v1/usage", query_string={"from": frm}, headers=auth).get_json()["users"][0]
    assert abs(part["cpu_seconds"] - 100) < 1 and abs(part["gpu_seconds"] - 200) < 1
    assert client.get("/api/v1/usage?from=nope", headers=auth).status_code == 422
    # Another user sees only themselves and may not ask for someone else; an admin may.
    other_id, other = make_user()
    other_auth = {"Authorization": f"Bearer {other}"}
    assert client.get("/api/v1/usage", headers=other_auth).get_json()["users"][0]["cpu_seconds"] == 0
    assert client.get(f"/api/v1/usage?user={me['user_id']}", headers=other_auth).status_code == 404
    _, admin = make_user(admin=True)
    seen = client.get(f"/api/v1/usage?user={me['user_id']}", headers={"Authorization": f"Bearer {admin}"}).get_json()
    assert [u["user_id"] for u in seen["users"]] == [me["user_id"]] and abs(seen["users"][0]["cpu_seconds"] - 300) < 1
