"""Per-token rate limits, counted in the real test Redis: separate read and write budgets, 429 with Retry-After."""

from __future__ import annotations

import pytest

MLP = {"kind": "train", "name": "digits-mlp", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
       "hyperparameters": {"epochs": 1}}


@pytest.fixture(scope="module")
def limited(settings):
    """An app with tiny budgets: 3 reads and 2 writes a minute per token."""
    from app import create_app

    app = create_app({
        "TESTING": True, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
        "STORAGE_ROOT": settings.storage_root, "RATE_LIMIT_READ": "3/minute", "RATE_LIMIT_WRITE": "2/minute",
    })
    return app.test_client()


def test_reads_and_writes_have_separate_budgets_and_429_says_when_to_retry(limited, auth, make_user):
    for remaining in (2, 1, 0):
        r = limited.get("/api/v1/jobs", headers=auth)
        assert r.status_code == 200
        assert r.headers["RateLimit-Limit"] == "3" and r.headers["RateLimit-Remaining"] == str(remaining)
        assert 0 <= int(r.headers["RateLimit-Reset"]) <= 61
    r = limited.get("/api/v1/jobs", headers=auth)
    assert r.status_code == 429 and r.mimetype == "application/problem+json"
    assert r.get_json()["type"] == "/problems/rate-limited"
    assert 0 < int(r.headers["Retry-After"]) <= 61 and r.headers["RateLimit-Remaining"] == "0"
    # The write budget is untouched by the reads.
    for _ in range(2):
        r = limited.post("/api/v1/tokens", json={"name": "t"}, headers=auth)
        assert r.status_code == 201 and r.headers["RateLimit-Limit"] == "2"
    r = limited.post("/api/v1/tokens", json={"name": "t"}, headers=auth)
    assert r.status_code == 429 and "Retry-After" in r.headers
    # Another token has budgets of its own.
    _, other = make_user()
    assert limited.get("/api/v1/jobs", headers={"Authorization": f"Bearer {other}"}).status_code == 200


def test_a_counted_request_makes_one_redis_round_trip(limited, auth, monkeypatch):
    import redis

    sent = []
    real = redis.Redis.execute_command

    def counting(self, *args, **options):
        sent.append(args[0])
        return real(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", counting)
    r = limited.post("/api/v1/tokens", json={"name": "t"}, headers=auth)  # another budget than the reads'
    assert r.status_code == 201 and r.headers["RateLimit-Limit"] == "2" and r.headers["RateLimit-Remaining"] == "1"
    assert 0 < int(r.headers["RateLimit-Reset"]) <= 61
    assert len(sent) == 1, sent


def test_a_limited_request_asks_redis_once_and_its_headers_stay_exact(limited, make_user, monkeypatch):
    import redis

    _, token = make_user()
    calls = []
    original = redis.Redis.execute_command

    def counting(self, *args, **options):
        if any(isinstance(a, str) and a.startswith("LIMITS:") for a in args):  # the limiter's keys
            calls.append(args[0])
        return original(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", counting)
    for remaining in (2, 1, 0):
        calls.clear()
        r = limited.get("/api/v1/jobs", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.headers["RateLimit-Remaining"] == str(remaining)
        assert 0 <= int(r.headers["RateLimit-Reset"]) <= 61
        assert len(calls) == 1, calls  # the hit, which also returns the window: no GET, no TTL
    r = limited.get("/api/v1/jobs", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 429 and 0 < int(r.headers["Retry-After"]) <= 61


def test_a_304_costs_no_read_budget_and_a_changed_answer_is_counted(limited, make_user, monkeypatch):
    import redis

    _, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    first = limited.get("/api/v1/jobs", headers=auth)
    assert first.status_code == 200 and first.headers["RateLimit-Remaining"] == "2"
    calls = []
    original = redis.Redis.execute_command

    def counting(self, *args, **options):
        if any(isinstance(a, str) and a.startswith("LIMITS:") for a in args):
            calls.append(args[0])
        return original(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", counting)
    unchanged = dict(auth, **{"If-None-Match": first.headers["ETag"]})
    for _ in range(5):  # more revalidations than the budget holds: none is counted, none asks Redis
        assert limited.get("/api/v1/jobs", headers=unchanged).status_code == 304
    assert calls == []
    # A conditional GET that needs a body is counted before it is built, and refused once the budget is spent.
    stale = dict(auth, **{"If-None-Match": '"stale"'})
    r = limited.get("/api/v1/jobs", headers=stale)
    assert r.status_code == 200 and r.headers["RateLimit-Remaining"] == "1" and len(calls) == 1
    assert limited.get("/api/v1/jobs/999999999", headers=stale).status_code == 404  # counted too
    r = limited.get("/api/v1/jobs", headers=stale)
    assert r.status_code == 429 and r.mimetype == "application/problem+json" and "Retry-After" in r.headers
    assert limited.get("/api/v1/jobs", headers=auth).status_code == 429
    assert limited.get("/api/v1/jobs", headers=unchanged).status_code == 304  # a 304 still answers


def test_a_write_is_counted_without_flask_limiters_resolution_and_answers_as_before(settings, make_user, monkeypatch):
    """An API write's one budget (shared by every write endpoint) is counted directly; its headers
    are Flask-Limiter's; a spent budget still answers Flask-Limiter's 429."""
    from flask_limiter import Limiter

    from app import create_app

    app = create_app({"TESTING": True, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
                      "STORAGE_ROOT": settings.storage_root, "RATE_LIMIT_READ": "50/minute",
                      "RATE_LIMIT_WRITE": "3/minute"})
    client = app.test_client()
    _, token = make_user()
    auth = {"Authorization": f"Bearer {token}"}
    resolved = []
    real = Limiter._check_request_limit

    def noting(self, *args, **kwargs):
        resolved.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Limiter, "_check_request_limit", noting)
    answers = [client.post("/api/v1/jobs", json=MLP, headers=auth),
               client.post("/api/v1/tokens", json={"name": "t"}, headers=auth),
               client.post("/api/v1/jobs", json=MLP, headers=auth)]
    assert [r.status_code for r in answers] == [201, 201, 201]
    assert [r.headers["RateLimit-Remaining"] for r in answers] == ["2", "1", "0"]
    assert all(r.headers["RateLimit-Limit"] == "3" and 0 < int(r.headers["RateLimit-Reset"]) <= 61 for r in answers)
    assert resolved == []  # the writes never went through Flask-Limiter's check
    refused = client.post("/api/v1/jobs", json=MLP, headers=auth)
    assert refused.status_code == 429 and refused.get_json()["type"] == "/problems/rate-limited"
    assert 0 < int(refused.headers["Retry-After"]) <= 61 and refused.headers["RateLimit-Remaining"] == "0"
    read = client.get("/api/v1/jobs", headers=auth)  # the read budget is apart, and still Flask-Limiter's
    assert read.status_code == 200 and read.headers["RateLimit-Limit"] == "50"
