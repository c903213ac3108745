"""API routes of the model registry on the ``/api/v1`` blueprint: versions, aliases, deletion.

Every route works on the caller's own models (admins included), like ``name@N`` in a spec; the
services live in :mod:`app.model_registry`, which the models page calls too.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify, request

from app import model_registry
from app.jobs.errors import SpecError
from app.models import MAX_ID, ModelVersion
from app.web import serializers
from app.web.api import api
from app.web.auth import current_user
from app.web.context import db


def _version_number(body: Any) -> int:
    if not isinstance(body, dict):
        raise SpecError.at("(body)", "the request body must be a JSON object like {\"version\": 3}")
    number = body.get("version")
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_ID:
        raise SpecError.at("version", "expected a version number (a positive integer)")
    return number


def _model(name: str, versions: list[ModelVersion], aliases: dict[str, ModelVersion]) -> dict[str, Any]:
    names: dict[int, list[str]] = {}
    for alias, target in aliases.items():
        names.setdefault(target.id, []).append(alias)
    return {
        "name": name,
        "aliases": {alias: target.version for alias, target in aliases.items()},
        "versions": [{**serializers.model_version(v), "aliases": names.get(v.id, [])} for v in versions],
    }


@api.get("/models/<name>")
def get_model(name: str):
    """A model's live versions (newest first, each with its lineage and input schema) and its aliases."""
    versions, aliases = model_registry.describe(session=db(), owner=current_user(), name=name)
    return jsonify(_model(name, versions, aliases))


@api.get("/models/<name>/versions/<int:number>")
def get_model_version(name: str, number: int):
    """One live version."""
    found = model_registry.version(session=db(), owner=current_user(), name=name, number=number)
    return jsonify(serializers.model_version(found))


@api.put("/models/<name>/aliases/<alias>")
def put_model_alias(name: str, alias: str):
    """Point an alias at a version (``{"version": N}``), creating or moving it."""
    session = db()
    number = _version_number(request.get_json(silent=True))
    model_registry.set_alias(session=session, owner=current_user(), name=name, alias=alias, number=number)
    versions, aliases = model_registry.describe(session=session, owner=current_user(), name=name)
    body = _model(name, versions, aliases)
    session.commit()
    return jsonify(body)


@api.delete("/models/<name>/aliases/<alias>")
def delete_model_alias(name: str, alias: str):
    """Remove an alias (``latest`` cannot be removed: it is not stored)."""
    model_registry.remove_alias(session=db(), owner=current_user(), name=name, alias=alias)
    db().commit()
    return Response(status=204)


@api.delete("/models/<name>/versions/<int:number>")
def delete_model_version(name: str, number: int):
    """Delete a version; 409 while an alias points at it or a queued or running job uses it."""
    model_registry.delete_version(session=db(), owner=current_user(), name=name, number=number)
    db().commit()
    return Response(status=204)
