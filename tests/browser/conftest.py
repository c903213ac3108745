"""The browser tests' shared parts: Debian's chromium and one real ``kiln web`` per test module."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from app.embedded import free_port
from tests.conftest import ROOT, settings_env

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


@pytest.fixture(scope="module")
def web(settings, tmp_path_factory):
    """A real ``kiln web`` (gunicorn) subprocess shared by a module's tests; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("web") / "web.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "web", "--port", str(port), "--workers", "1"],
                            cwd=ROOT, env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log_path.read_text(errors="replace")) from None
            time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
