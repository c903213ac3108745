"""A real ``kiln web`` (gunicorn) for the client and CLI tests, with a user and its token."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass

import pytest

from app.accounts import create_user
from app.db import session_scope
from app.embedded import free_port
from tests.conftest import ROOT, settings_env

# A training job that ends in seconds on a CPU.
IRIS_SPEC = {"kind": "train", "name": "cli-iris", "model": {"arch": "mlp", "hidden_sizes": [16]},
             "dataset": {"id": "builtin:iris"}, "hyperparameters": {"epochs": 2, "batch_size": 16, "seed": 0}}


@dataclass
class Server:
    """A running server's URL and one user's API token."""

    url: str
    token: str
    log: str


@pytest.fixture(scope="session")
def server(settings, tmp_path_factory) -> Server:
    """``python -m app.cli web`` on a free port against the test database and Redis."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("web") / "web.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "web", "--port", str(port), "--workers", "1"],
                            cwd=ROOT, env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(log_path.read_text(errors="replace")) from None
            time.sleep(0.3)
    with session_scope(settings.database_url) as s:
        _, token = create_user(session=s, email=f"cli{uuid.uuid4().hex[:10]}@example.com")
    yield Server(url, token, str(log_path))
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
