"""A revalidating poll's token and version in one statement (app/web/revalidate.py): a 304 runs one
statement and opens no session, and every case but the plain one answers as the ordinary path does:
a revoked or expired token or a disabled user 401, a foreign job 404 even with its ETag, a due token
use recorded, an admin sees every job."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import event, inspect, select, update

from app.accounts import TOKEN_USE_RESOLUTION, hash_token
from app.db import get_engine, session_scope
from app.models import ApiToken, Metric, User, utcnow

MLP = {"kind": "train", "name": "conditional-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
       "hyperparameters": {"epochs": 1}}
POLLS = ("/api/v1/jobs", "/api/v1/jobs?state=queued&limit=5", "/api/v1/jobs/{id}", "/api/v1/jobs/{id}/metrics",
         "/api/v1/jobs/{id}/metrics?scope=step&points=8")


@pytest.fixture
def recorded(settings):
    """Every statement the app's engine sends while the test runs."""
    seen: list[str] = []
    engine = get_engine(settings.database_url)

    def on_execute(_conn, _cursor, statement, *_args):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", on_execute)
    yield seen
    event.remove(engine, "before_cursor_execute", on_execute)


def submit(client, headers) -> int:
    response = client.post("/api/v1/jobs", json=MLP, headers=headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def add_metric(settings, job_id: int, step: int = 0) -> None:
    with session_scope(settings.database_url) as s:
        s.add(Metric(job_id=job_id, attempt=1, scope="step", epoch=0, step=step, values={"train_loss": 1.0}))


def revalidating(headers, etag):
    return {**headers, "If-None-Match": etag}


def set_token(settings, token: str, **values) -> None:
    # A bulk UPDATE, as another process (the CLI, another web worker) would make it.
    with session_scope(settings.database_url) as s:
        s.execute(update(ApiToken).where(ApiToken.token_sha256 == hash_token(token)).values(**values))


@pytest.mark.parametrize("path", POLLS)
def test_a_304_is_one_statement_that_reads_the_token_and_the_version(client, make_user, settings, recorded, path):
    _, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    job_id = submit(client, auth)  # also records the token's use
    add_metric(settings, job_id)
    path = path.format(id=job_id)
    etag = client.get(path, headers=auth).headers["ETag"]
    recorded.clear()
    response = client.get(path, headers=revalidating(auth, etag))
    assert response.status_code == 304 and response.headers["ETag"] == etag
    assert len(recorded) == 1 and "api_tokens" in recorded[0], recorded
    # The version still moves: a new report (metrics, the job) or a state change (list, job) answers 200.
    add_metric(settings, job_id, step=1)
    client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth)
    changed = client.get(path, headers=revalidating(auth, etag))
    assert changed.status_code == 200 and changed.headers["ETag"] != etag and changed.get_json()


def test_a_revoked_token_gets_401_at_its_next_conditional_poll(client, make_user, settings):
    _, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    job_id = submit(client, auth)
    for path in (p.format(id=job_id) for p in POLLS):
        etag = client.get(path, headers=auth).headers["ETag"]
        assert client.get(path, headers=revalidating(auth, etag)).status_code == 304
    set_token(settings, token, revoked_at=utcnow())
    for path in (p.format(id=job_id) for p in POLLS):
        response = client.get(path, headers=revalidating(auth, '"anything", *'))
        assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer"), path


def test_an_expired_token_and_a_disabled_user_get_401_on_a_conditional_poll(client, make_user, settings):
    user_id, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    etag = client.get("/api/v1/jobs", headers=auth).headers["ETag"]
    assert client.get("/api/v1/jobs", headers=revalidating(auth, etag)).status_code == 304
    set_token(settings, token, expires_at=utcnow() - timedelta(seconds=1))
    assert client.get("/api/v1/jobs", headers=revalidating(auth, etag)).status_code == 401
    set_token(settings, token, expires_at=None)
    assert client.get("/api/v1/jobs", headers=revalidating(auth, etag)).status_code == 304
    with session_scope(settings.database_url) as s:
        s.execute(update(User).where(User.id == user_id).values(active=False))
    assert client.get("/api/v1/jobs", headers=revalidating(auth, etag)).status_code == 401


def test_a_foreign_job_is_404_even_with_its_owners_etag_and_an_admin_gets_the_304(client, make_user, settings):
    _, owner = make_user()
    _, stranger = make_user()
    _, admin = make_user(admin=True)
    mine, theirs, boss = ({"Authorization": f"Bearer {t}"} for t in (owner, stranger, admin))
    job_id = submit(client, mine)
    client.get("/api/v1/jobs", headers=theirs)  # the stranger's token use is recorded: the one-statement path
    client.get("/api/v1/jobs", headers=boss)
    for path in (f"/api/v1/jobs/{job_id}", f"/api/v1/jobs/{job_id}/metrics",
                 f"/api/v1/jobs/{job_id}/metrics?scope=step&points=8"):
        etag = client.get(path, headers=mine).headers["ETag"]
        assert client.get(path, headers=revalidating(mine, etag)).status_code == 304
        # The job's ETag does not name its owner: the stranger must still learn nothing of it.
        assert client.get(path, headers=revalidating(theirs, etag)).status_code == 404, path
        assert client.get(path, headers=revalidating(theirs, "*")).status_code == 404, path
        assert client.get(path, headers=revalidating(boss, etag)).status_code == 304, path
    assert client.get("/api/v1/jobs/999999999", headers=revalidating(mine, "*")).status_code == 404
    # Lists are per caller: the stranger's list does not carry the owner's version.
    etag = client.get("/api/v1/jobs", headers=mine).headers["ETag"]
    assert client.get("/api/v1/jobs", headers=revalidating(theirs, etag)).status_code == 200


def test_a_due_token_use_is_recorded_by_a_conditional_poll(client, make_user, settings):
    _, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    etag = client.get("/api/v1/jobs", headers=auth).headers["ETag"]
    stale = utcnow() - TOKEN_USE_RESOLUTION - timedelta(seconds=5)
    set_token(settings, token, last_used_at=stale)
    assert client.get("/api/v1/jobs", headers=revalidating(auth, etag)).status_code == 304
    with session_scope(settings.database_url) as s:
        used = s.execute(select(ApiToken.last_used_at).where(ApiToken.token_sha256 == hash_token(token))).scalar_one()
    assert used > stale + TOKEN_USE_RESOLUTION


def test_the_user_of_the_one_statement_path_is_attached_when_a_session_opens(app, client, make_user):
    # Detached on the 304 path (no session); a body's session attaches it, so columns the lookup did not
    # read (the password hash) still load, from this user's row.
    from flask import g

    from app.web.context import db

    _, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    client.get("/api/v1/jobs", headers=auth)  # records the token's use
    with app.test_request_context("/api/v1/jobs", headers=revalidating(auth, '"old"')):
        assert app.preprocess_request() is None
        assert inspect(g.user).detached and "db_session" not in g
        session = db()
        assert g.user in session and not inspect(g.user).detached
        assert g.user.password_hash is None and g.user.email.endswith("@example.com")
