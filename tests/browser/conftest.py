"""The browser tests' shared parts: Debian's chromium and one real ``kiln web`` per test module."""

from __future__ import annotations


import pytest

from tests.conftest import WebProcess, settings_env

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


@pytest.fixture(scope="module")
def web(settings, tmp_path_factory):
    """A real ``kiln web`` (gunicorn) subprocess shared by a module's tests; yields its base URL."""
    server = WebProcess(settings_env(settings), tmp_path_factory.mktemp("web") / "web.log").wait_ready()
    yield server.url
    server.stop()
