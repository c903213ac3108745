"""Bearer-token authentication for the API."""

from __future__ import annotations

from flask import g, request

from app.accounts import authenticate, record_use, use_due
from app.models import User
from app.web import revalidate
from app.web.context import db, poll_bind, settings
from app.web.problems import problem

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def load_user():
    """``before_request`` hook: set ``g.user`` from ``Authorization: Bearer``, else answer 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    found = None
    if scheme.lower() == "bearer":
        # A revalidating poll: its token and its version in one statement, without a session.
        if (user := revalidate.authenticate(token.strip())) is not None:
            g.user = user
            return None
        # Any other request: one Core statement on a pooled connection (no session of its own, no
        # ORM loading; autocommit, so no write lock and no transaction), unless the cache holds it.
        found = authenticate(bind=poll_bind(), token=token.strip(), cache_seconds=settings().token_cache_seconds)
    if found is None:
        response = problem(401, "Unauthorized", "send a valid API token as 'Authorization: Bearer <token>'")
        response.headers["WWW-Authenticate"] = 'Bearer realm="kiln"'
        return response
    g.user, entry = found
    session = db()  # adopts g.user: its other columns load through the request's session
    if use_due(entry):
        record_use(session=session, entry=entry)
        if request.method in SAFE_METHODS:
            # A read has no transaction of its own to carry the (rare) token-use write; a write
            # request commits it together with its own work, in one transaction.
            session.commit()
    return None


def current_user() -> User:
    """The authenticated user of this request."""
    return g.user
