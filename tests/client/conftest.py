"""A real ``kiln web`` (gunicorn) for the client and CLI tests, with a user and its token."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from app.accounts import create_user
from app.db import session_scope
from tests.conftest import WebProcess, settings_env

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
    web = WebProcess(settings_env(settings), tmp_path_factory.mktemp("web") / "web.log").wait_ready()
    with session_scope(settings.database_url) as s:
        _, token = create_user(session=s, email=f"cli{uuid.uuid4().hex[:10]}@example.com")
    yield Server(web.url, token, str(web.log_path))
    web.stop()
