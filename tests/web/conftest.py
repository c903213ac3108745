"""Web tests publish to a Redis database that no worker consumes, so queued jobs stay queued."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def app(settings):
    """The Flask app, publishing to an unconsumed Redis database."""
    from app import create_app

    unconsumed = settings.redis_url.rsplit("/", 1)[0] + "/13"
    return create_app({
        "TESTING": True, "DATABASE_URL": settings.database_url, "REDIS_URL": unconsumed,
        "STORAGE_ROOT": settings.storage_root,
    })
