"""Bearer-token authentication for the API."""

from __future__ import annotations

from flask import g, request

from app.accounts import authenticate
from app.models import User
from app.web.context import db
from app.web.problems import problem


def load_user():
    """``before_request`` hook: set ``g.user`` from ``Authorization: Bearer``, else answer 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    user = authenticate(session=db(), token=token.strip()) if scheme.lower() == "bearer" else None
    if user is None:
        response = problem(401, "Unauthorized", "send a valid API token as 'Authorization: Bearer <token>'")
        response.headers["WWW-Authenticate"] = 'Bearer realm="kiln"'
        return response
    db().commit()  # last_used_at
    g.user = user
    return None


def current_user() -> User:
    """The authenticated user of this request."""
    return g.user
