"""Settings: ``KILN_*`` variables, ``_FILE`` secrets, named bad values, production refusals."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.settings import DEFAULT_SECRET_KEY, ConfigurationError, load
from tests.conftest import ROOT

SECURE = {
    "KILN_ENV": "production",
    "KILN_SECRET_KEY": "s3cret-" * 6,
    "KILN_DATABASE_URL": "postgresql+psycopg://kiln:pw@db:5432/kiln",
    "KILN_REDIS_URL": "redis://:pw@redis:6379/0",
}


def test_defaults_and_variables(tmp_path):
    s = load({"KILN_VAR_DIR": str(tmp_path)})
    assert s.env == "development" and s.secret_key == DEFAULT_SECRET_KEY
    assert s.database_url == f"sqlite:///{tmp_path / 'kiln.db'}" and s.storage_root == tmp_path / "storage"
    assert s.lease_seconds == 30.0 and s.max_attempts == 3 and s.metrics_port is None
    s = load({"KILN_LEASE_SECONDS": "7.5", "KILN_MAX_ATTEMPTS": "5", "KILN_METRICS_PORT": "9100",
              "KILN_LOG_LEVEL": "", "KILN_TORCH_THREADS": "1"})
    assert (s.lease_seconds, s.max_attempts, s.metrics_port, s.log_level) == (7.5, 5, 9100, "INFO")
    assert s.with_overrides(lease_seconds=2).lease_seconds == 2.0 and s.lease_seconds == 7.5


def test_a_bad_value_names_its_variable():
    with pytest.raises(ConfigurationError, match="KILN_LEASE_SECONDS='abc'"):
        load({"KILN_LEASE_SECONDS": "abc"})
    with pytest.raises(ConfigurationError, match="KILN_METRICS_PORT"):
        load({"KILN_METRICS_PORT": "70000"})
    with pytest.raises(ConfigurationError, match="KILN_ENV"):
        load({"KILN_ENV": "prod"})


def test_secrets_are_read_from_files(tmp_path):
    (tmp_path / "key").write_text("from-a-file\n")
    (tmp_path / "db").write_text("postgresql+psycopg://kiln:pw@db/kiln")
    (tmp_path / "redis").write_text("redis://:pw@redis:6379/0\n\n")
    s = load({"KILN_SECRET_KEY_FILE": str(tmp_path / "key"), "KILN_DATABASE_URL_FILE": str(tmp_path / "db"),
              "KILN_REDIS_URL_FILE": str(tmp_path / "redis")})
    assert s.secret_key == "from-a-file"  # the trailing newline is not part of the secret
    assert s.database_url == "postgresql+psycopg://kiln:pw@db/kiln"
    assert s.redis_url == "redis://:pw@redis:6379/0\n"  # only one trailing newline is stripped
    with pytest.raises(ConfigurationError, match="KILN_SECRET_KEY_FILE: cannot read"):
        load({"KILN_SECRET_KEY_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigurationError, match="both set"):
        load({"KILN_SECRET_KEY_FILE": str(tmp_path / "key"), "KILN_SECRET_KEY": "x"})
    assert "from-a-file" not in repr(s)


def test_production_accepts_secure_settings():
    assert load(SECURE).production


@pytest.mark.parametrize("variable, value, problem", [
    ("KILN_SECRET_KEY", DEFAULT_SECRET_KEY, "KILN_SECRET_KEY is the built-in development key"),
    ("KILN_DATABASE_URL", "sqlite:////tmp/kiln.db", "KILN_DATABASE_URL is SQLite"),
    ("KILN_REDIS_URL", "redis://redis:6379/0", "KILN_REDIS_URL has no password"),
])
def test_production_refuses_each_insecure_setting(variable, value, problem):
    with pytest.raises(ConfigurationError) as exc:
        load({**SECURE, variable: value})
    assert problem in str(exc.value) and str(exc.value).count("  - ") == 1
    assert load({**SECURE, variable: value, "KILN_ALLOW_INSECURE": "1"}).production


def test_production_lists_every_problem_at_once():
    with pytest.raises(ConfigurationError) as exc:
        load({"KILN_ENV": "production"})
    message = str(exc.value)
    for name in ("KILN_SECRET_KEY", "KILN_DATABASE_URL", "KILN_REDIS_URL", "KILN_ALLOW_INSECURE=1"):
        assert name in message
    # The redis password may also come as a query parameter.
    assert load({**SECURE, "KILN_REDIS_URL": "redis://redis:6379/0?password=pw"}).production


def _run(args: list[str], extra: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(KILN_ENV="production", KILN_VAR_DIR=str(tmp_path), **extra)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [["web"], ["worker"], ["reaper"], ["db", "upgrade"]])
def test_every_entry_point_refuses_insecure_production(command, tmp_path):
    out = _run(["-m", "app.cli", *command], {}, tmp_path)
    assert out.returncode != 0
    for name in ("KILN_SECRET_KEY", "KILN_DATABASE_URL", "KILN_REDIS_URL"):
        assert name in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_the_app_factory_refuses_too_when_gunicorn_is_started_directly(tmp_path):
    out = _run(["-c", "from app import create_app; create_app()"], {}, tmp_path)
    assert out.returncode != 0 and "KILN_SECRET_KEY is the built-in development key" in out.stderr


def test_allow_insecure_lets_production_start(tmp_path):
    out = _run(["-m", "app.cli", "db", "upgrade"], {"KILN_ALLOW_INSECURE": "1"}, tmp_path)
    assert out.returncode == 0 and "up to date" in out.stdout, out.stderr
    bad = _run(["-m", "app.cli", "reaper"], {"KILN_ALLOW_INSECURE": "1", "KILN_LEASE_SECONDS": "abc"}, tmp_path)
    assert bad.returncode != 0 and "KILN_LEASE_SECONDS='abc'" in bad.stderr and "Traceback" not in bad.stderr


def test_kiln_up_is_development_mode(tmp_path):
    # `kiln up --help` is not enough: settings are read when it starts, so start it with a port
    # already taken and check it gets past the settings to the web (which then cannot bind).
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _run(["-m", "app.cli", "up", "--port", str(port)], {}, tmp_path)
    assert "production mode" not in out.stderr
    assert "Kiln did not start: the web process exited" in out.stderr
