"""Request-scoped helpers: the database session, the settings, the authenticated user."""

from __future__ import annotations

from flask import current_app, g, request
from sqlalchemy import inspect
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
        user = g.get("user")
        if user is not None and inspect(user).detached:
            # Authenticated without a session (app.web.revalidate): attached now, as a lookup would have.
            g.user = g.db_session.merge(user, load=False)
    return g.db_session


def poll_bind():
    """What a GET's session runs on, for one statement without a session: on PostgreSQL autocommit
    (no BEGIN or ROLLBACK round trip); on SQLite pysqlite's lock-free autocommit reads."""
    return session_factory(settings().database_url, poll=True).kw["bind"]


def reader() -> Session:
    """A session for reads that need no write lock (a submit's validation).

    It is the request's own session, except on SQLite in a request that may write: there it is a
    read session of its own, so the write session's ``BEGIN IMMEDIATE`` (the database-wide write
    lock) is taken by the first write, not by the reads before it, and held only until the commit.
    """
    if request.method in ("GET", "HEAD", "OPTIONS") or not settings().database_url.startswith("sqlite"):
        return db()
    if "read_session" not in g:
        g.read_session = session_factory(settings().database_url)()
    return g.read_session


def release() -> None:
    """End the request's open transactions before a long wait on the client (streaming an upload).

    What the request wrote so far (a token's use) is committed; the sessions stay usable and begin
    a new transaction at their next statement. Without this, the transaction of the sign-in lookup
    would stay open while the body streams in: on PostgreSQL a connection idle in a transaction
    (and killed by ``idle_in_transaction_session_timeout``), on SQLite possibly the write lock.
    """
    for name in ("db_session", "read_session"):
        session = g.get(name)
        if session is not None:
            session.commit()


def release_reader() -> None:
    """End the request's own read session (SQLite writes), returning its connection to the pool
    before the write session takes one: a request holding one connection while it waits for a
    second could, with as many such requests as the pool has connections, wait for ever (the pool
    gives up after 30 s: a 500). Objects it loaded stay readable, detached; a later :func:`reader` opens anew."""
    session = g.pop("read_session", None)
    if session is not None:
        session.close()


def close_session(_exc: BaseException | None = None) -> None:
    """Roll back anything uncommitted and close the request's sessions."""
    for name in ("db_session", "read_session"):
        session = g.pop(name, None)
        if session is not None:
            session.close()  # ends (rolls back) any transaction in progress and returns the connection
