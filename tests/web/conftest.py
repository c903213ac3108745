"""Web tests publish to a Redis database that no worker consumes, so queued jobs stay queued."""

from __future__ import annotations

import pytest

from tests.conftest import REDIS_URL


@pytest.fixture(scope="session")
def app(settings):
    """The Flask app, publishing to an unconsumed Redis database."""
    from app import create_app

    return create_app({
        "TESTING": True, "DATABASE_URL": settings.database_url, "REDIS_URL": REDIS_URL.rsplit("/", 1)[0] + "/13",
        "STORAGE_ROOT": settings.storage_root,
    })
