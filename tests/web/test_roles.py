"""Roles and passwords in the service layer: one rule (``can_write``) for the API and the pages."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from app.accounts import authenticate_password, create_user, set_password
from app.db import session_scope
from tests.conftest import ROOT
from tests.test_cli import kiln

TRAIN = {"kind": "train", "name": "viewer-try", "model": {"arch": "mlp"}, "dataset": {"id": "builtin:digits"},
         "hyperparameters": {"epochs": 1}}


def _user(database_url: str, role: str, password: str | None = None) -> tuple[int, str, str]:
    email = f"{role}-{uuid.uuid4().hex[:10]}@example.com"
    with session_scope(database_url) as s:
        user, token = create_user(session=s, email=email, role=role, password=password)
        return user.id, email, token


def test_passwords_are_hashed_with_scrypt_and_checked(database_url, session):
    _, email, _ = _user(database_url, "user", "correct horse battery")
    user = authenticate_password(session=session, email=email.upper(), password="correct horse battery")
    assert user is not None and user.email == email
    assert user.password_hash.startswith("scrypt:") and "correct" not in user.password_hash
    assert authenticate_password(session=session, email=email, password="wrong password") is None
    assert authenticate_password(session=session, email="nobody@example.com", password="whatever1") is None
    with pytest.raises(ValueError, match="at least 8"):
        set_password(user, "short")


def test_a_disabled_user_or_one_without_a_password_cannot_sign_in(database_url, session):
    _, email, _ = _user(database_url, "user", "a fine password")
    _, no_pw_email, _ = _user(database_url, "user")
    assert authenticate_password(session=session, email=no_pw_email, password="") is None
    user = authenticate_password(session=session, email=email, password="a fine password")
    user.active = False
    session.flush()
    assert authenticate_password(session=session, email=email, password="a fine password") is None


def test_unknown_roles_are_refused(session):
    with pytest.raises(ValueError, match="role must be one of"):
        create_user(session=session, email="x@example.com", role="root")


def test_admin_role_keeps_is_admin(database_url, session):
    from app.models import User

    uid, _, _ = _user(database_url, "admin")
    assert session.get(User, uid).is_admin
    vid, _, _ = _user(database_url, "viewer")
    assert not session.get(User, vid).is_admin


def test_a_viewer_reads_but_every_api_write_is_403(database_url, client, auth):
    job = client.post("/api/v1/jobs", json=TRAIN, headers=auth)
    assert job.status_code == 201
    _, _, token = _user(database_url, "viewer")
    viewer = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/jobs", headers=viewer).status_code == 200
    writes = [
        client.post("/api/v1/jobs", json=TRAIN, headers=viewer),
        client.post(f"/api/v1/jobs/{job.get_json()['id']}/cancel", headers=viewer),
        client.post("/api/v1/jobs/1/retry", headers=viewer),
        client.post("/api/v1/jobs/1/pause", headers=viewer),
        client.post("/api/v1/jobs/1/resume", headers=viewer),
        client.post("/api/v1/datasets", data={}, headers=viewer),
    ]
    for response in writes:
        assert response.status_code == 403, response.get_data(as_text=True)
        assert response.mimetype == "application/problem+json"
        assert "viewer" in response.get_json()["detail"]
    # the owner's job was not touched by the refused cancel
    assert client.get(f"/api/v1/jobs/{job.get_json()['id']}", headers=auth).get_json()["state"] == "queued"


def test_cli_creates_a_viewer_with_a_password_from_stdin(database_url, session):
    email = f"cli-viewer-{uuid.uuid4().hex[:8]}@example.com"
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "users", "create", email, "--role", "viewer", "--password-stdin"],
        cwd=ROOT, env={**os.environ, "KILN_DATABASE_URL": database_url},
        input="stdin password\n", capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert f"created viewer {email} (can sign in to the web)" in out.stdout
    user = authenticate_password(session=session, email=email, password="stdin password")
    assert user is not None and user.role == "viewer"
    clash = kiln("users", "create", "x@example.com", "--admin", "--role", "viewer", database_url=database_url)
    assert clash.returncode != 0 and "disagree" in clash.stderr
