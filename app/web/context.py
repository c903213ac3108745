"""Request-scoped helpers: the database session, the settings, the authenticated user."""

from __future__ import annotations

from flask import current_app, g, request
from sqlalchemy.orm import Session

from app.db import session_factory
from app.settings import Settings
from app.webhooks import PUBLISHER


def settings() -> Settings:
    """The settings this app was built with."""
    return current_app.extensions["kiln"]


def db() -> Session:
    """The request's session (created on first use, closed at teardown); a request that may write
    gets a write session, so its one transaction holds the SQLite write lock from its start. A
    GET's session commits each statement at once (its only write, a token's use, is one statement)."""
    if "db_session" not in g:
        write = request.method not in ("GET", "HEAD", "OPTIONS")
        g.db_session = session_factory(settings().database_url, write=write, poll=not write)()
        g.db_session.info[PUBLISHER] = settings()  # webhook deliveries it commits go to this app's broker
    return g.db_session


def close_session(_exc: BaseException | None = None) -> None:
    """Roll back anything uncommitted and close the request's session."""
    session = g.pop("db_session", None)
    if session is not None:
        session.rollback()
        session.close()
