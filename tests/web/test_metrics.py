"""Who may read /metrics: a bearer token, a port of its own, and never public in production by default."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from app.embedded import free_port
from tests.conftest import WebProcess, settings_env


@pytest.fixture
def make_app(settings):
    from app import create_app

    def _make(**overrides):
        config = {"TESTING": True, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
                  "STORAGE_ROOT": settings.storage_root}
        config.update({k.upper(): v for k, v in overrides.items()})
        return create_app(config).test_client()

    return _make


def test_development_serves_metrics_on_the_web_port(make_app):
    response = make_app().get("/metrics")
    assert response.status_code == 200 and "kiln_jobs" in response.get_data(as_text=True)


def test_production_without_token_or_port_keeps_metrics_off_the_web_port(make_app):
    client = make_app(env="production", allow_insecure=True)
    assert client.get("/metrics").status_code == 404
    assert client.get("/healthz").status_code == 200


def test_a_token_is_required_when_set(make_app):
    for env in ("development", "production"):
        client = make_app(env=env, allow_insecure=True, metrics_token="scrape-me")
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics").headers["WWW-Authenticate"].startswith("Bearer")
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert ok.status_code == 200 and "kiln_jobs" in ok.get_data(as_text=True)


def test_a_metrics_port_moves_metrics_off_the_web_port(make_app, auth):
    client = make_app(metrics_port=9100)
    assert client.get("/metrics").status_code == 404
    assert client.get("/metrics", base_url="http://localhost:9100").status_code == 200
    # The metrics port serves nothing else.
    assert client.get("/api/v1/jobs", headers=auth, base_url="http://localhost:9100").status_code == 404
    assert client.get("/api/v1/jobs", headers=auth).status_code == 200
    both = make_app(metrics_port=9100, metrics_token="t")
    assert both.get("/metrics", base_url="http://localhost:9100").status_code == 401
    assert both.get("/metrics", headers={"Authorization": "Bearer t"}).status_code == 404


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_kiln_web_serves_metrics_on_the_metrics_port_only(settings, tmp_path):
    web_port, metrics_port = free_port(), free_port()
    env = settings_env(settings)
    env.update(KILN_METRICS_PORT=str(metrics_port), KILN_ENV="production", KILN_ALLOW_INSECURE="1")
    server = WebProcess(env, tmp_path / "web.log", port=web_port).wait_ready()
    try:
        assert _status(f"http://127.0.0.1:{metrics_port}/metrics") == 200, server.log()
        assert _status(f"http://127.0.0.1:{web_port}/metrics") == 404
        assert _status(f"http://127.0.0.1:{metrics_port}/healthz") == 404
    finally:
        server.stop()
