"""Polls write nothing, a submit is one write transaction, 304s build no body, long series are downsampled."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import event, select, update

from app import token_cache
from app.accounts import TOKEN_USE_RESOLUTION, hash_token
from app.db import get_engine, session_scope
from app.models import ApiToken, Job, Metric, utcnow
from app.web import serializers
from app.jobs.metric_curves import downsample

MLP = {"kind": "train", "name": "poll-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
       "hyperparameters": {"epochs": 1}}
WRITES = ("INSERT", "UPDATE", "DELETE")


@contextmanager
def statements(settings):
    """Every SQL statement the app's engine runs inside the block, and every COMMIT."""
    seen: list[str] = []
    commits: list[int] = []
    engine = get_engine(settings.database_url)

    def on_execute(_conn, _cursor, statement, *_args):
        seen.append(statement.lstrip().split(None, 1)[0].upper())

    def on_commit(_conn):
        commits.append(len(seen))

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "commit", on_commit)
    try:
        yield seen, commits
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine, "commit", on_commit)


def add_metrics(settings, job_id: int, losses: list[float], scope: str = "step") -> None:
    with session_scope(settings.database_url) as s:
        s.add_all(Metric(job_id=job_id, attempt=1, scope=scope, epoch=i // 100, step=i,
                         values={"train_loss": loss, "lr": 0.1}) for i, loss in enumerate(losses))


def test_authenticated_reads_write_nothing(client, auth, settings):
    job_id = client.post("/api/v1/jobs", json=MLP, headers=auth).get_json()["id"]
    add_metrics(settings, job_id, [1.0, 0.5, 0.25])
    client.get("/api/v1/jobs", headers=auth)  # token use was recorded by the submit already
    with statements(settings) as (seen, commits):
        for path in (f"/api/v1/jobs/{job_id}", "/api/v1/jobs", "/api/v1/jobs?state=queued&kind=train",
                     f"/api/v1/jobs/{job_id}/metrics", f"/api/v1/jobs/{job_id}/metrics?points=8"):
            assert client.get(path, headers=auth).status_code == 200, path
    assert seen, "the reads ran no SQL at all?"
    assert [s for s in seen if s in WRITES] == [] and commits == []


def test_token_use_is_recorded_at_most_once_per_window(client, make_user, settings):
    _, token = make_user()
    headers = {"Authorization": f"Bearer {token}"}

    def last_used():
        with session_scope(settings.database_url) as s:
            return s.execute(select(ApiToken.last_used_at).where(ApiToken.token_sha256 == hash_token(token))).scalar_one()

    assert last_used() is None
    client.get("/api/v1/jobs", headers=headers)
    first = last_used()
    assert first is not None
    with statements(settings) as (seen, _):
        client.get("/api/v1/jobs", headers=headers)
    assert "UPDATE" not in seen and last_used() == first
    # Time passes: the first request after the window records the use again.
    stale = utcnow() - TOKEN_USE_RESOLUTION - timedelta(seconds=5)
    with session_scope(settings.database_url) as s:
        s.execute(update(ApiToken).where(ApiToken.token_sha256 == hash_token(token)).values(last_used_at=stale))
    token_cache.clear()  # a bulk UPDATE behind the unit of work's back: as if token_cache_seconds had passed
    client.get("/api/v1/jobs", headers=headers)
    assert last_used() > stale + TOKEN_USE_RESOLUTION


def test_a_submit_is_one_write_transaction_and_is_marked_published(client, auth, settings):
    with statements(settings) as (seen, commits):
        r = client.post("/api/v1/jobs", json=MLP, headers=auth)
    assert r.status_code == 201
    assert len(commits) == 1, (seen, commits)
    writes_after_commit = [s for s in seen[commits[0]:] if s in WRITES]
    assert writes_after_commit == []
    with session_scope(settings.database_url) as s:
        job = s.get(Job, r.get_json()["id"])
        assert job.published_at is not None and job.state == "queued"


def test_a_failed_publish_leaves_the_job_for_the_reconciler(app, auth, settings):
    from app import create_app

    broken = create_app({"TESTING": True, "DATABASE_URL": settings.database_url,
                         "REDIS_URL": "redis://127.0.0.1:1/0", "STORAGE_ROOT": settings.storage_root})
    r = broken.test_client().post("/api/v1/jobs", json=MLP, headers=auth)
    assert r.status_code == 201 and r.get_json()["state"] == "queued"
    from app.jobs.recovery import due_wakeups

    with session_scope(settings.database_url) as s:
        assert s.get(Job, r.get_json()["id"]).published_at is None
        assert r.get_json()["id"] in [w.job_id for w in due_wakeups(session=s, settings=settings)]


@pytest.mark.parametrize("path", ["/api/v1/jobs/{id}", "/api/v1/jobs", "/api/v1/jobs/{id}/metrics?points=8"])
def test_a_304_builds_no_body_and_a_change_changes_the_etag(client, auth, settings, monkeypatch, path):
    job_id = client.post("/api/v1/jobs", json=MLP, headers=auth).get_json()["id"]
    add_metrics(settings, job_id, [1.0, 0.5])
    url = path.format(id=job_id)
    first = client.get(url, headers=auth)
    etag = first.headers["ETag"]

    def forbidden(*_a, **_k):
        raise AssertionError("a 304 serialised the body")

    with monkeypatch.context() as m:
        for name in ("job_summary", "job_detail", "metrics_page", "metric_series"):
            m.setattr(serializers, name, forbidden)
        again = client.get(url, headers={**auth, "If-None-Match": etag})
    assert again.status_code == 304 and again.get_data() == b"" and again.headers["ETag"] == etag
    add_metrics(settings, job_id, [0.1])  # a new metric changes the job page and its metrics
    if "metrics" not in url and url.endswith("/jobs"):
        client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth)  # a state change changes the list
    changed = client.get(url, headers={**auth, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag


def test_a_state_change_changes_the_job_etag(client, auth):
    job_id = client.post("/api/v1/jobs", json=MLP, headers=auth).get_json()["id"]
    etag = client.get(f"/api/v1/jobs/{job_id}", headers=auth).headers["ETag"]
    client.post(f"/api/v1/jobs/{job_id}/pause", headers=auth)
    changed = client.get(f"/api/v1/jobs/{job_id}", headers={**auth, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.get_json()["state"] == "paused"


def test_downsample_keeps_first_last_min_and_max_of_every_bucket():
    values = [float(i % 17) for i in range(1000)]
    values[123] = -50.0  # a dip and a spike must survive
    values[777] = 99.0
    kept = downsample(values, 40)
    assert len(kept) <= 40 and kept == sorted(set(kept))
    assert kept[0] == 0 and kept[-1] == 999 and 123 in kept and 777 in kept
    for b in range(10):
        lo, hi = b * 100, (b + 1) * 100
        bucket = [i for i in kept if lo <= i < hi]
        chunk = values[lo:hi]
        assert lo in bucket and hi - 1 in bucket
        assert min(chunk) in [values[i] for i in bucket] and max(chunk) in [values[i] for i in bucket]
    assert downsample([3.0, 1.0, 2.0], 8) == [0, 1, 2]


def test_metrics_api_downsamples_each_curve_and_pages(client, auth, settings):
    job_id = client.post("/api/v1/jobs", json=MLP, headers=auth).get_json()["id"]
    losses = [1.0 / (1 + i) for i in range(600)]
    losses[300] = 42.0
    add_metrics(settings, job_id, losses)
    body = client.get(f"/api/v1/jobs/{job_id}/metrics?points=100&scope=step", headers=auth).get_json()
    curves = {(c["scope"], c["name"]): c for c in body["series"]}
    assert set(curves) == {("step", "train_loss"), ("step", "lr")}
    loss = curves["step", "train_loss"]
    assert loss["count"] == 600 and len(loss["points"]) <= 100
    steps = [p[2] for p in loss["points"]]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 599
    assert [p[3] for p in loss["points"] if p[2] == 300] == [42.0]
    page = client.get(f"/api/v1/jobs/{job_id}/metrics?limit=250", headers=auth).get_json()
    assert len(page["items"]) == 250 and page["next_after"] == page["items"][-1]["id"]
    rest = client.get(f"/api/v1/jobs/{job_id}/metrics?limit=500&after={page['next_after']}", headers=auth).get_json()
    assert len(rest["items"]) == 350 and rest["next_after"] is None
    assert rest["items"][0]["step"] == 250
    for bad in ("points=2", "points=x", "scope=nope"):
        r = client.get(f"/api/v1/jobs/{job_id}/metrics?{bad}", headers=auth)
        assert r.status_code == 422 and r.mimetype == "application/problem+json", bad


def test_a_page_of_reports_answers_each_as_it_was_recorded(client, auth, settings):
    from datetime import datetime, timezone

    from sqlalchemy import text

    job_id = client.post("/api/v1/jobs", json=MLP, headers=auth).get_json()["id"]
    whole = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    moments = [whole, whole.replace(microsecond=120), whole.replace(microsecond=999999)]
    with session_scope(settings.database_url) as s:
        for i, at in enumerate(moments):
            s.add(Metric(job_id=job_id, attempt=1, scope="epoch", epoch=i, step=i, at=at,
                         values={"val_loss": 0.5 / (i + 1), "acc": None, "note": [1, {"k": "v"}]}))
        if s.bind.dialect.name == "sqlite":
            # A row from before non-finite numbers were stored as null (PostgreSQL's JSON never held NaN).
            s.execute(text("INSERT INTO metrics (job_id, attempt, scope, epoch, step, \"values\", at) "
                           "VALUES (:job, 1, 'epoch', 3, 3, '{\"val_loss\": NaN, \"r2\": 0.1}', '2026-01-02 03:04:05.000000')"),
                      {"job": job_id})
    items = client.get(f"/api/v1/jobs/{job_id}/metrics?limit=10", headers=auth).get_json()["items"]
    assert [m["at"] for m in items[:3]] == ["2026-01-02T03:04:05Z", "2026-01-02T03:04:05.000120Z",
                                            "2026-01-02T03:04:05.999999Z"]
    assert [m["values"] for m in items[:3]] == [{"val_loss": 0.5 / (i + 1), "acc": None, "note": [1, {"k": "v"}]}
                                                for i in range(3)]
    assert [(m["epoch"], m["step"], m["attempt"], m["scope"]) for m in items[:3]] == [(i, i, 1, "epoch") for i in range(3)]
    assert len(items) == (4 if settings.database_url.startswith("sqlite") else 3)
    if len(items) == 4:
        assert items[3]["values"] == {"val_loss": None, "r2": 0.1} and items[3]["at"] == "2026-01-02T03:04:05Z"


def test_every_change_of_a_job_changes_its_owners_list_etags_and_a_304_reads_no_job(client, make_user, settings):
    from sqlalchemy import delete

    from app.jobs import attempts, service
    from tests.conftest import submit_unpublished

    owner_id, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    _, other_token = make_user()
    _, admin_token = make_user(admin=True)
    first = submit_unpublished(settings, owner_id, MLP)
    lists = {
        "owner": ("/api/v1/jobs", auth),
        "owner, filtered": ("/api/v1/jobs?state=succeeded&kind=train", auth),
        "owner, past the newest": (f"/api/v1/jobs?cursor={first}", auth),
        "other": ("/api/v1/jobs", {"Authorization": f"Bearer {other_token}"}),
        "admin": ("/api/v1/jobs", {"Authorization": f"Bearer {admin_token}"}),
    }

    def etags() -> dict[str, str]:
        tags = {}
        for name, (path, headers) in lists.items():
            r = client.get(path, headers=headers)
            again = client.get(path, headers={**headers, "If-None-Match": r.headers["ETag"]})
            assert r.status_code == 200 and again.status_code == 304, name  # unchanged: 304
            tags[name] = r.headers["ETag"]
        return tags

    def changed(action) -> set[str]:
        before = etags()
        action()
        after = etags()
        return {name for name in lists if before[name] != after[name]}

    def in_session(work):
        def run():
            with session_scope(settings.database_url, write=True) as s:
                work(s)
        return run

    mine = {"owner", "owner, filtered", "owner, past the newest", "admin"}
    job_id = submit_unpublished(settings, owner_id, MLP)
    holder = {}

    def claim(s):
        holder["owner"] = attempts.lease_owner(attempts.claim(
            session=s, job_id=job_id, token=0, worker="w", host="h", pid=1, lease_seconds=60))

    def fenced(**kw):
        return dict(session=None, job_id=job_id, token=1, owner=holder["owner"], lease_seconds=60, **kw)

    steps = {
        "submit": lambda: client.post("/api/v1/jobs", json=MLP, headers=auth),
        "published": in_session(lambda s: service.mark_published(session=s, job_id=job_id)),
        "claimed (queued -> running)": in_session(claim),
        "lease renewed": in_session(lambda s: attempts.renew(**{**fenced(), "session": s})),
        "progress": in_session(lambda s: attempts.record_batch(**{**fenced(metrics=[], progress=0.5), "session": s})),
        "cancel requested (still running)": lambda: client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth),
        "finished (running -> cancelled)": in_session(
            lambda s: attempts.finish(session=s, job_id=job_id, token=1, to="cancelled")),
        "retried": lambda: client.post(f"/api/v1/jobs/{job_id}/retry", headers=auth),
        "paused": lambda: client.post(f"/api/v1/jobs/{job_id}/pause", headers=auth),
        "resumed": lambda: client.post(f"/api/v1/jobs/{job_id}/resume", headers=auth),
        "cancelled while queued": lambda: client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth),
        "deleted": in_session(lambda s: s.execute(delete(Job).where(Job.id == job_id))),
    }
    for step, action in steps.items():
        assert changed(action) == mine, step
    assert changed(lambda: client.post("/api/v1/jobs", json=MLP, headers=lists["other"][1])) == {"other", "admin"}

    # A 304 of a list is decided from the version alone: no statement reads the jobs table.
    seen: list[str] = []
    engine = get_engine(settings.database_url)
    listener = lambda _c, _cur, statement, *_a: seen.append(statement)  # noqa: E731
    etag = client.get("/api/v1/jobs", headers=auth).headers["ETag"]
    event.listen(engine, "before_cursor_execute", listener)
    try:
        assert client.get("/api/v1/jobs", headers={**auth, "If-None-Match": etag}).status_code == 304
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert seen and not [s for s in seen if "FROM jobs" in s or "JOIN jobs" in s], seen
