"""The ``kiln`` console script."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def kiln(*args: str, database_url: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KILN_DATABASE_URL=database_url)
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_users_create_prints_a_working_token_last(database_url, client):
    out = kiln("users", "create", "cli-user@example.com", "--admin", database_url=database_url)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip().splitlines()[-1]
    assert token.startswith("kiln_")
    assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    again = kiln("users", "create", "cli-user@example.com", database_url=database_url)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_db_upgrade_on_a_fresh_file(tmp_path):
    out = kiln("db", "upgrade", database_url=f"sqlite:///{tmp_path / 'new.db'}")
    assert out.returncode == 0 and "up to date" in out.stdout
    assert (tmp_path / "new.db").exists()


def test_another_token_can_be_issued_and_all_revoked(database_url, client):
    kiln("users", "create", "rotate@example.com", database_url=database_url)
    out = kiln("users", "token", "rotate@example.com", database_url=database_url)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/jobs", headers=headers).status_code == 200
    revoked = kiln("users", "revoke-tokens", "rotate@example.com", database_url=database_url)
    assert "revoked 2 token(s)" in revoked.stdout
    assert client.get("/api/v1/jobs", headers=headers).status_code == 401
    missing = kiln("users", "token", "nobody@example.com", database_url=database_url)
    assert missing.returncode != 0 and "no user" in missing.stderr
