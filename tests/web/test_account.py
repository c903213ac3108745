"""Tokens on /account and /api/v1/tokens; users on /admin/users and /api/v1/users (admins only)."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

from sqlalchemy import update

from app import token_cache
from app.db import session_scope
from app.models import ApiToken, utcnow
from tests.web.test_pages import PASSWORD, csrf_token, person, sign_in  # noqa: F401 - person is a fixture


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_token_made_on_the_account_page_is_shown_once_works_and_dies_when_revoked(client, person):
    email, _ = person()
    sign_in(client, email, PASSWORD)
    page = client.get("/account").get_data(as_text=True)
    assert 'for="token-name"' in page and 'for="token-expiry"' in page
    made = client.post("/account/tokens", data={"csrf_token": csrf_token(page), "name": "laptop",
                                                      "expires_on": "2999-12-31"})
    assert made.status_code == 201
    token = re.search(r'id="new-token"[^>]*value="(kiln_[^"]+)"', made.get_data(as_text=True)).group(1)
    again = client.get("/account").get_data(as_text=True)
    assert token not in again and "laptop" in again and token[:12] in again  # the prefix only
    assert "3000-01-01 00:00 UTC" in again  # valid through 31 December 2999
    assert client.get("/api/v1/jobs", headers=bearer(token)).status_code == 200
    token_id = re.search(r'action="/account/tokens/(\d+)/revoke"', again).group(1)
    assert client.post(f"/account/tokens/{token_id}/revoke").status_code == 400  # no CSRF token
    revoked = client.post(f"/account/tokens/{token_id}/revoke", data={"csrf_token": csrf_token(again)},
                          follow_redirects=True)
    assert "revoked" in revoked.get_data(as_text=True)
    assert client.get("/api/v1/jobs", headers=bearer(token)).status_code == 401


def test_tokens_api_creates_lists_and_revokes_and_an_expired_token_answers_401(client, person, database_url):
    _, headers = person()
    _, other = person()
    made = client.post("/api/v1/tokens", json={"name": "ci", "expires_at": "2999-12-31"}, headers=headers)
    assert made.status_code == 201
    body = made.get_json()
    assert body["token"].startswith("kiln_") and body["expires_at"].startswith("3000-01-01T00:00")
    assert client.get("/api/v1/jobs", headers=bearer(body["token"])).status_code == 200
    listed = client.get("/api/v1/tokens", headers=headers).get_json()["items"]
    assert [t["name"] for t in listed][:1] == ["ci"] and all("token" not in t for t in listed)
    assert client.post("/api/v1/tokens", json={"name": "old", "expires_at": "2000-01-01"}, headers=headers).status_code == 422
    assert client.post("/api/v1/tokens", json={"name": ""}, headers=headers).status_code == 422
    # Expiry passes: the same token answers 401 at its next request.
    with session_scope(database_url) as s:
        s.execute(update(ApiToken).where(ApiToken.id == body["id"]).values(expires_at=utcnow() - timedelta(seconds=1)))
    token_cache.clear()  # a bulk UPDATE, not the unit of work: as if token_cache_seconds had passed
    assert client.get("/api/v1/jobs", headers=bearer(body["token"])).status_code == 401
    assert client.get("/api/v1/tokens", headers=headers).get_json()["items"][0]["status"] == "expired"
    second = client.post("/api/v1/tokens", json={"name": "short"}, headers=headers).get_json()
    assert client.delete(f"/api/v1/tokens/{second['id']}", headers=other).status_code == 404
    assert client.delete(f"/api/v1/tokens/{second['id']}", headers=headers).status_code == 204
    assert client.get("/api/v1/jobs", headers=bearer(second["token"])).status_code == 401


def test_a_viewer_manages_their_own_tokens_but_still_cannot_write_jobs(client, person):
    _, headers = person("viewer")
    made = client.post("/api/v1/tokens", json={"name": "viewer-token"}, headers=headers)
    assert made.status_code == 201
    token = made.get_json()["token"]
    job = {"kind": "train", "name": "x", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"}}
    assert client.post("/api/v1/jobs", json=job, headers=bearer(token)).status_code == 403
    assert client.delete(f"/api/v1/tokens/{made.get_json()['id']}", headers=headers).status_code == 204


def test_admin_creates_a_user_with_a_role_then_disabling_them_ends_token_and_sign_in(client, person):
    admin_email, admin = person("admin")
    email = f"new-{uuid.uuid4().hex[:8]}@example.com"
    created = client.post("/api/v1/users", json={"email": email, "role": "viewer", "password": PASSWORD}, headers=admin)
    assert created.status_code == 201
    body = created.get_json()
    assert body["role"] == "viewer" and body["active"] is True and "password_hash" not in body
    assert client.get("/api/v1/jobs", headers=bearer(body["token"])).status_code == 200
    assert client.post("/api/v1/users", json={"email": email, "role": "user"}, headers=admin).status_code == 409
    assert client.post("/api/v1/users", json={"email": "x@y.z", "role": "owner"}, headers=admin).status_code == 422
    changed = client.patch(f"/api/v1/users/{body['id']}", json={"role": "user", "active": False}, headers=admin)
    assert changed.status_code == 200 and changed.get_json() | {"created_at": None} == {
        "id": body["id"], "email": email, "role": "user", "active": False, "has_password": True, "created_at": None}
    assert client.get("/api/v1/jobs", headers=bearer(body["token"])).status_code == 401
    assert sign_in(client.application.test_client(), email, PASSWORD).status_code == 401
    assert client.patch(f"/api/v1/users/{body['id']}", json={"active": True}, headers=admin).status_code == 200
    assert sign_in(client.application.test_client(), email, PASSWORD).status_code == 302


def test_users_api_and_pages_are_404_for_users_and_viewers(client, person):
    for role in ("user", "viewer"):
        email, headers = person(role)
        assert client.get("/api/v1/users", headers=headers).status_code == 404
        assert client.post("/api/v1/users", json={"email": "a@b.c", "role": "admin"}, headers=headers).status_code == 404
        assert client.patch("/api/v1/users/1", json={"role": "admin"}, headers=headers).status_code == 404
        browser = client.application.test_client()
        sign_in(browser, email, PASSWORD)
        assert browser.get("/admin/users").status_code == 404
        assert "/admin/users" not in browser.get("/jobs").get_data(as_text=True)


def test_self_disable_and_removing_the_last_admin_are_refused(client, person, database_url):
    from sqlalchemy import select

    from app.models import User

    admin_email, admin = person("admin")
    with session_scope(database_url) as s:
        me = s.execute(select(User).where(User.email == admin_email)).scalar_one()
        # Only this test's admin is left active, whatever other tests made.
        s.execute(update(User).where(User.role == "admin", User.id != me.id).values(active=False))
        my_id = me.id
    token_cache.clear()  # a bulk UPDATE, not the unit of work: as if token_cache_seconds had passed
    refused = client.patch(f"/api/v1/users/{my_id}", json={"active": False}, headers=admin)
    assert refused.status_code == 409 and "your own account" in refused.get_json()["detail"]
    last = client.patch(f"/api/v1/users/{my_id}", json={"role": "user"}, headers=admin)
    assert last.status_code == 409 and "last active admin" in last.get_json()["detail"]
    _, second = person("admin")
    second_id = client.get("/api/v1/users", headers=admin).get_json()["items"][-1]["id"]
    assert client.patch(f"/api/v1/users/{my_id}", json={"role": "user"}, headers=second).status_code == 200
    assert client.patch(f"/api/v1/users/{second_id}", json={"active": False}, headers=second).status_code == 409


def test_admin_users_page_creates_and_disables_with_csrf_forms(client, person):
    admin_email, _ = person("admin")
    sign_in(client, admin_email, PASSWORD)
    page = client.get("/admin/users").get_data(as_text=True)
    assert 'for="new-email"' in page and 'for="new-role"' in page and 'for="new-password"' in page
    email = f"page-{uuid.uuid4().hex[:8]}@example.com"
    made = client.post("/admin/users", data={"csrf_token": csrf_token(page), "email": email, "role": "user",
                                             "password": PASSWORD})
    assert made.status_code == 201 and f"Created {email}" in made.get_data(as_text=True)
    user_id = re.search(rf'<tr id="user-(\d+)">\s*<td data-label="Email">{re.escape(email)}', made.get_data(as_text=True)).group(1)
    assert sign_in(client.application.test_client(), email, PASSWORD).status_code == 302
    done = client.post(f"/admin/users/{user_id}", data={"csrf_token": csrf_token(page), "role": "user"},
                       follow_redirects=True)  # the Enabled box unticked
    assert f"{email}: user, disabled." in done.get_data(as_text=True)
    assert sign_in(client.application.test_client(), email, PASSWORD).status_code == 401
    me = re.search(r'<tr id="user-(\d+)">\s*<td data-label="Email">[^<]*<small>\(you\)', done.get_data(as_text=True)).group(1)
    mine = client.post(f"/admin/users/{me}", data={"csrf_token": csrf_token(page), "role": "admin"}, follow_redirects=True)
    assert "you cannot disable your own account" in mine.get_data(as_text=True)
