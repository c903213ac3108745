"""Bearer-token authentication for the API."""

from __future__ import annotations

from flask import g, request

from app.accounts import authenticate
from app.models import User
from app.web import revalidate
from app.web.context import db, reader, settings
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
        # The lookup (when the token is not cached) takes no write lock (see ``context.reader``) and
        # runs on its connection: a Core row, without the ORM execution path.
        found = authenticate(session=db(), token=token.strip(), lookup=reader(),
                             cache_seconds=settings().token_cache_seconds)
    if found is None:
        response = problem(401, "Unauthorized", "send a valid API token as 'Authorization: Bearer <token>'")
        response.headers["WWW-Authenticate"] = 'Bearer realm="kiln"'
        return response
    user, recorded = found
    if recorded and request.method in SAFE_METHODS:
        # A read has no transaction of its own to carry the (rare) token-use write; a write
        # request commits it together with its own work, in one transaction.
        db().commit()
    g.user = user
    return None


def current_user() -> User:
    """The authenticated user of this request."""
    return g.user
