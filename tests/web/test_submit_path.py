"""The submit path at the speed of its parts: a short write transaction, an answer built from what was
inserted, and bearer tokens resolved from a cache that a revocation empties."""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import event, update

from app import token_cache
from app.db import WRITE_OPTION, get_engine
from app.models import ApiToken, utcnow
from tests.conftest import run_inline

READS = ("SELECT",)
WRITES = ("INSERT", "UPDATE", "DELETE")
TRAIN = {"kind": "train", "model": {"arch": "mlp", "hidden_sizes": [8]}, "dataset": {"id": "builtin:iris"},
         "hyperparameters": {"epochs": 1, "learning_rate": 0.05}}
IRIS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def model(app, settings, make_user_module):
    """A tiny trained iris model: (its owner's bearer headers, its reference)."""
    _, token = make_user_module()
    client = app.test_client()
    r = client.post("/api/v1/jobs", json={**TRAIN, "name": f"submit-{uuid.uuid4().hex[:8]}"}, headers=bearer(token))
    assert r.status_code == 201, r.get_json()
    assert run_inline(settings, r.get_json()["id"]) == "succeeded"
    ref = client.get(f"/api/v1/jobs/{r.get_json()['id']}", headers=bearer(token)).get_json()["result"]["model"]
    return bearer(token), ref


@pytest.fixture(scope="module")
def make_user_module(settings):
    """Like ``make_user``, for module fixtures."""
    from app.accounts import create_user
    from app.db import session_scope

    def _make(role: str = "user") -> tuple[int, str]:
        with session_scope(settings.database_url) as s:
            user, token = create_user(session=s, email=f"s{uuid.uuid4().hex[:12]}@example.com", role=role)
            return user.id, token

    return _make


@pytest.mark.parametrize("kind", ["train", "predict", "fine-tune"])
def test_the_201_answer_is_the_job_as_a_read_of_it_answers(client, model, kind):
    headers, ref = model
    spec = {"train": {**TRAIN, "name": "answered"}, "predict": {"kind": "predict", "model": ref, "inputs": IRIS},
            "fine-tune": {**TRAIN, "name": "tuned", "init_from": ref}}[kind]
    created = client.post("/api/v1/jobs", json=spec, headers=headers)
    assert created.status_code == 201, created.get_json()
    read = client.get(created.headers["Location"], headers=headers)
    assert read.status_code == 200
    assert created.get_json() == read.get_json()  # every field, though nothing was read back to build it
    if kind == "predict":
        assert created.get_json()["model"]["ref"] == ref
    if kind == "fine-tune":
        assert created.get_json()["init_from"] == ref


@contextmanager
def traced(settings):
    """Every SQL statement the app's engine runs inside the block (whole text), the positions of its
    commits, and where each write transaction began (a write session's, whatever its first statement)."""
    seen: list[str] = []
    commits: list[int] = []
    write_begins: list[int] = []
    engine = get_engine(settings.database_url)

    def on_execute(_conn, _cursor, statement, *_args):
        seen.append(" ".join(statement.split()))

    def on_commit(_conn):
        commits.append(len(seen))

    def on_begin(conn):
        if conn.get_execution_options().get(WRITE_OPTION):
            write_begins.append(len(seen))

    hooks = (("before_cursor_execute", on_execute), ("commit", on_commit), ("begin", on_begin))
    for name, hook in hooks:
        event.listen(engine, name, hook)
    try:
        yield seen, commits, write_begins
    finally:
        for name, hook in hooks:
            event.remove(engine, name, hook)


def _verb(statement: str) -> str:
    return statement.split(None, 1)[0].upper()


def test_a_submit_takes_the_write_lock_only_for_its_inserts(client, settings, model, make_user):
    headers, ref = model
    _, token = make_user()
    client.get("/api/v1/jobs", headers=bearer(token))  # its first use recorded (a write of its own)
    token_cache.clear()  # not cached: its lookup is one of the submit's reads
    for spec in ({**TRAIN, "name": "locked"}, {"kind": "predict", "model": ref, "inputs": IRIS}):
        use = bearer(token) if spec["kind"] == "train" else headers
        with traced(settings) as (full, commits, write_begins):
            r = client.post("/api/v1/jobs", json=spec, headers=use)
        assert r.status_code == 201, r.get_json()
        seen = [_verb(s) for s in full]
        assert len(commits) == 1, seen
        sqlite = settings.database_url.startswith("sqlite")
        first_write = next(i for i, s in enumerate(seen) if s in WRITES or s == "WITH")
        transaction = seen[first_write:commits[0]]
        # Validation and the token lookup read before the transaction writes; after its first write
        # it only inserts the job, its event and the owner's usage count (an INSERT .. ON CONFLICT
        # upsert); nothing is read back for the answer. On PostgreSQL the three are one statement
        # (data-modifying CTEs): one round trip.
        assert transaction == (["INSERT", "INSERT", "INSERT"] if sqlite else ["WITH"]), seen
        assert any(s in READS for s in seen[:first_write]), seen
        # One write transaction. On SQLite it begins at its first write, after every read (its BEGIN
        # IMMEDIATE takes the database-wide write lock there); on PostgreSQL the validation's reads
        # (the model a prediction names) run in it, the token lookup never does.
        assert len(write_begins) == 1, (write_begins, seen)
        assert write_begins[0] == first_write if sqlite else 0 < write_begins[0] <= first_write, (write_begins, seen)
        assert [i for i, s in enumerate(full) if "api_tokens" in s] < write_begins, full
        assert all(s not in READS for s in seen[first_write:]), seen


def test_an_api_request_resolves_its_token_with_one_statement_outside_its_transaction(client, settings, make_user):
    """A GET and a submit each read their token once, on a connection of its own (not in the write
    transaction) and write nothing for it while its use was recorded less than five minutes ago."""
    _, token = make_user()
    assert client.get("/api/v1/jobs", headers=bearer(token)).status_code == 200  # its first use recorded
    for method, path, body in (("GET", "/api/v1/jobs", None), ("GET", "/api/v1/usage", None),
                               ("POST", "/api/v1/jobs", {**TRAIN, "name": "one-lookup"})):
        with traced(settings) as (full, commits, write_begins):
            r = client.open(path, method=method, json=body, headers=bearer(token))
        assert r.status_code in (200, 201), r.get_json()
        lookups = [i for i, s in enumerate(full) if "api_tokens" in s]
        assert len(lookups) == 1 and _verb(full[lookups[0]]) == "SELECT", full  # no UPDATE of its use
        if method == "GET":
            assert not commits and not write_begins, full  # a read writes nothing
        else:
            assert len(commits) == 1 and len(write_begins) == 1 and lookups[0] < write_begins[0], full


@pytest.mark.parametrize("change", ["revoked", "expired", "disabled"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_token_changed_by_another_process_is_refused_at_the_next_request(client, settings, make_user, change,
                                                                          method):
    """With the token cache off (the default) the one-statement lookup reads the token's row at every
    request: a revocation, an expiry or a disabled owner, written by anyone, applies at once."""
    from app.models import User

    user_id, token = make_user()
    spec = {**TRAIN, "name": f"after-{change}"} if method == "POST" else None
    assert client.open("/api/v1/jobs", method=method, json=spec, headers=bearer(token)).status_code in (200, 201)
    # Another process changes it: a plain UPDATE no session of this process sees.
    with get_engine(settings.database_url).begin() as conn:
        if change == "disabled":
            conn.execute(update(User.__table__).where(User.id == user_id).values(active=False))
        else:
            column = "revoked_at" if change == "revoked" else "expires_at"
            conn.execute(update(ApiToken.__table__).where(ApiToken.user_id == user_id)
                         .values({column: utcnow() - timedelta(seconds=1)}))
    refused = client.open("/api/v1/jobs", method=method, json=spec, headers=bearer(token))
    assert refused.status_code == 401, refused.get_json()
    assert refused.headers["Content-Type"].startswith("application/problem+json")


@pytest.fixture(scope="module")
def cached_app(settings):
    """The API with a long token cache, so a cached lookup is certain within a test."""
    from app import create_app

    return create_app({"TESTING": True, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
                       "STORAGE_ROOT": settings.storage_root, "TOKEN_CACHE_SECONDS": 300})


def _token_id(client, token: str) -> int:
    return client.get("/api/v1/tokens", headers=bearer(token)).get_json()["items"][-1]["id"]


def test_a_cached_token_is_resolved_without_a_query(cached_app, settings, make_user):
    _, token = make_user()
    client = cached_app.test_client()
    assert client.get("/api/v1/jobs", headers=bearer(token)).status_code == 200
    engine, seen = get_engine(settings.database_url), []

    def on_execute(_conn, _cursor, statement, *_args):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        assert client.get("/api/v1/jobs", headers=bearer(token)).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
    assert seen, "the list ran no SQL at all?"
    assert not [s for s in seen if "api_tokens" in s or "FROM users" in s], seen


def test_a_revoked_token_is_refused_at_once_by_the_process_that_revoked_it(cached_app, make_user):
    client = cached_app.test_client()
    _, token = make_user()
    second = client.post("/api/v1/tokens", json={"name": "second"}, headers=bearer(token)).get_json()
    assert client.get("/api/v1/jobs", headers=bearer(second["token"])).status_code == 200  # cached now
    assert client.delete(f"/api/v1/tokens/{second['id']}", headers=bearer(token)).status_code in (200, 204)
    assert client.get("/api/v1/jobs", headers=bearer(second["token"])).status_code == 401


def test_a_disabled_or_demoted_user_is_refused_at_once_by_the_process_that_changed_them(cached_app, make_user):
    client = cached_app.test_client()
    _, admin = make_user(admin=True)
    user_id, token = make_user()
    assert client.post("/api/v1/jobs", json={**TRAIN, "name": "before"}, headers=bearer(token)).status_code == 201
    assert client.patch(f"/api/v1/users/{user_id}", json={"role": "viewer"}, headers=bearer(admin)).status_code == 200
    assert client.post("/api/v1/jobs", json={**TRAIN, "name": "viewer"}, headers=bearer(token)).status_code == 403
    assert client.patch(f"/api/v1/users/{user_id}", json={"active": False}, headers=bearer(admin)).status_code == 200
    assert client.get("/api/v1/jobs", headers=bearer(token)).status_code == 401


def test_a_token_revoked_by_another_process_is_refused_within_the_cache_bound(settings, make_user):
    from app import create_app

    bound = 0.5
    app = create_app({"TESTING": True, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
                      "STORAGE_ROOT": settings.storage_root, "TOKEN_CACHE_SECONDS": bound})
    client = app.test_client()
    user_id, token = make_user()
    assert client.get("/api/v1/jobs", headers=bearer(token)).status_code == 200  # cached now
    # Another process revokes it: a plain UPDATE this process's sessions never see.
    with get_engine(settings.database_url).begin() as conn:
        conn.execute(update(ApiToken.__table__).where(ApiToken.user_id == user_id).values(revoked_at=utcnow()))
    time.sleep(bound + 0.2)
    assert client.get("/api/v1/jobs", headers=bearer(token)).status_code == 401


def test_a_cached_token_expires_at_its_expiry(cached_app, make_user):
    client = cached_app.test_client()
    _, token = make_user()
    expires = utcnow() + timedelta(seconds=2)
    made = client.post("/api/v1/tokens", json={"name": "brief", "expires_at": expires.isoformat()},
                       headers=bearer(token))
    assert made.status_code == 201, made.get_json()
    short = made.get_json()["token"]
    assert client.get("/api/v1/jobs", headers=bearer(short)).status_code == 200  # cached now
    time.sleep(max(0.0, (expires - utcnow()).total_seconds()) + 0.2)
    assert client.get("/api/v1/jobs", headers=bearer(short)).status_code == 401


def test_a_submit_writes_its_job_its_event_and_one_more_job_on_its_usage_shard(client, settings, make_user):
    """What the submit's one write transaction leaves (on PostgreSQL one statement, elsewhere three)."""
    from sqlalchemy import func, select

    from app.db import session_scope
    from app.models import Job, JobEvent, UsageTotal
    from app.usage import SHARDS

    user_id, token = make_user()
    ids = []
    for n in range(SHARDS + 2):  # two shards get a second job: the upsert adds to an existing row
        r = client.post("/api/v1/jobs", json={**TRAIN, "name": f"counted-{n}"}, headers=bearer(token))
        assert r.status_code == 201, r.get_json()
        ids.append(r.get_json()["id"])
    with session_scope(settings.database_url) as s:
        jobs = s.execute(select(Job.id, Job.state, Job.owner_id, Job.result).where(Job.id.in_(ids))).all()
        assert sorted(j.id for j in jobs) == ids and {(j.state, j.owner_id) for j in jobs} == {("queued", user_id)}
        assert all(j.result is None for j in jobs)
        events = s.execute(select(JobEvent.job_id, JobEvent.kind, JobEvent.to_state, JobEvent.message)
                           .where(JobEvent.job_id.in_(ids))).all()
        assert sorted(events) == [(i, "submitted", "queued", "train job submitted") for i in ids]
        shards = dict(s.execute(select(UsageTotal.shard, UsageTotal.jobs).where(UsageTotal.user_id == user_id)).all())
        expected: dict[int, int] = {}
        for i in ids:
            expected[i % SHARDS] = expected.get(i % SHARDS, 0) + 1
        assert shards == expected
        assert s.execute(select(func.sum(UsageTotal.attempts)).where(UsageTotal.user_id == user_id)).scalar() == 0


@pytest.mark.parametrize("path", ["/api/v1/models/{ref}/predict?wait=0", "/api/v1/jobs?wait=0"])
def test_an_inline_answer_reads_the_job_again_but_not_the_model_the_submit_resolved(client, settings, model, path):
    """The answer after the wait is the job as a read answers it; the model version the submit's
    validation loaded goes into the answer's session instead of being read a second time."""
    headers, ref = model
    seen: list[str] = []
    engine = get_engine(settings.database_url)

    def note(_conn, _cursor, statement, *_args):
        seen.append(" ".join(statement.split()))

    body = {"inputs": IRIS} if "/models/" in path else {"kind": "predict", "model": ref, "inputs": IRIS}
    event.listen(engine, "before_cursor_execute", note)
    try:
        r = client.post(path.format(ref=ref), json=body, headers=headers)
    finally:
        event.remove(engine, "before_cursor_execute", note)
    assert r.status_code == 202, r.get_json()  # no worker consumes this Redis: the wait ends unanswered
    version_reads = [s for s in seen if s.startswith("SELECT") and "FROM model_versions" in s]
    assert len(version_reads) == 1, "\n".join(s[:60] + " ... " + s[-80:] for s in seen)  # the submit's resolution only
    read = client.get(r.headers["Location"], headers=headers)
    assert r.get_json() == read.get_json()
    assert r.get_json()["model"]["ref"] == ref
