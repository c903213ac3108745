"""API routes for accounts, datasets and the admin overview, registered on the ``/api/v1`` blueprint.

Each calls the same service as its page: tokens and users in :mod:`app.accounts`, dataset
preview and deletion in :mod:`app.datasets`, the overview in :mod:`app.jobs.overview`.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify, request, url_for

from app import accounts, datasets
from app.jobs.errors import SpecError
from app.models import ApiToken, User
from app.web import conditional
from app.web.api import api
from app.web.auth import current_user
from app.web.context import db, settings
from app.web.idempotency import json_view as idempotent

def _body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise SpecError.at("(body)", "the request body must be a JSON object (Content-Type: application/json)")
    return body


def _string(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise SpecError.at(name, "must be a string")
    return value


def token_json(token: ApiToken) -> dict[str, Any]:
    """A token as the API shows it (never its secret)."""
    return {"id": token.id, "name": token.name, "prefix": token.prefix, "status": accounts.token_status(token),
            "created_at": token.created_at.isoformat(),
            "last_used_at": token.last_used_at.isoformat() if token.last_used_at else None,
            "expires_at": token.expires_at.isoformat() if token.expires_at else None,
            "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None}


def user_json(user: User) -> dict[str, Any]:
    """A user as the users API shows it (never the password hash)."""
    return {"id": user.id, "email": user.email, "role": user.role, "active": user.active,
            "has_password": user.password_hash is not None, "created_at": user.created_at.isoformat()}


@api.get("/tokens")
def list_tokens():
    """The caller's own API tokens (secrets are never shown again)."""
    return jsonify(items=[token_json(t) for t in accounts.list_tokens(session=db(), user=current_user())])


@api.post("/tokens")
@idempotent
def create_token():
    """Create a token ``{"name", "expires_at"?}``; the answer's ``token`` is the only time it is shown."""
    body = _body()
    token, plain = accounts.create_token(
        session=db(), user=current_user(), name=_string(body, "name") or "",
        expires_at=accounts.parse_expiry(_string(body, "expires_at")),
    )
    payload = token_json(token) | {"token": plain}
    db().commit()
    return jsonify(payload), 201


@api.delete("/tokens/<int:token_id>")
def revoke_token(token_id: int):
    """Revoke one of the caller's tokens: its next request answers 401."""
    accounts.revoke_token(session=db(), user=current_user(), token_id=token_id)
    db().commit()
    return Response(status=204)


@api.get("/users")
def list_users():
    """Every user (admins only; 404 for anyone else)."""
    return jsonify(items=[user_json(u) for u in accounts.list_users(session=db(), actor=current_user())])


@api.post("/users")
@idempotent
def create_user():
    """Create a user ``{"email", "role", "password"?}`` (admins only); answers with a first API token, shown once."""
    accounts.require_admin(current_user())
    body = _body()
    user, plain = accounts.add_user(session=db(), actor=current_user(), email=_string(body, "email") or "",
                                    role=_string(body, "role") or "user", password=_string(body, "password"))
    payload = user_json(user) | {"token": plain}
    db().commit()
    response = jsonify(payload)
    response.status_code = 201
    response.headers["Location"] = url_for("api.list_users")
    return response


@api.patch("/users/<int:user_id>")
def update_user(user_id: int):
    """Set ``role``, ``active`` or ``password`` (admins only); 409 for self-disable or removing the last admin."""
    accounts.require_admin(current_user())
    body = _body()
    active = body.get("active")
    if active is not None and not isinstance(active, bool):
        raise SpecError.at("active", "must be true or false")
    user = accounts.update_user(session=db(), actor=current_user(), user_id=user_id, role=_string(body, "role"),
                                active=active, password=_string(body, "password"))
    payload = user_json(user)
    db().commit()
    return jsonify(payload)


@api.get("/admin/overview")
def admin_overview():
    """The admin dashboard's data: jobs by state, queues, workers, running jobs, failures, usage (admins only);
    304 while its version is unchanged (``If-None-Match``)."""
    accounts.require_admin(current_user())
    tag, version = conditional.overview_tag()
    return conditional.answer(tag, lambda: jsonify(conditional.shared_overview(version)))


@api.delete("/datasets/<int:dataset_id>")
def delete_dataset(dataset_id: int):
    """Delete an uploaded dataset (file, then row); 409 while a job that has not ended trains on it."""
    datasets.delete(session=db(), user=current_user(), dataset_id=dataset_id, settings=settings())
    db().commit()
    return Response(status=204)


@api.get("/datasets/<int:dataset_id>/rows")
def dataset_rows(dataset_id: int):
    """The first ``limit`` rows of an uploaded dataset (default 20, at most 200)."""
    raw = request.args.get("limit") or str(datasets.PREVIEW_ROWS)
    if not raw.isdigit() or not 1 <= int(raw) <= datasets.MAX_PREVIEW_ROWS:
        raise SpecError.at("limit", f"must be an integer from 1 to {datasets.MAX_PREVIEW_ROWS}")
    return jsonify(datasets.preview(session=db(), user=current_user(), dataset_id=dataset_id,
                                    settings=settings(), limit=int(raw)))
