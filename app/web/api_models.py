"""API routes of the model registry on the ``/api/v1`` blueprint: versions, aliases, deletion.

Every route works on the caller's own models (admins included), like ``name@N`` in a spec; the
services live in :mod:`app.model_registry`, which the models page calls too.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify, request

from app import model_registry, model_signals
from app.jobs.errors import SpecError
from app.jobs.schemas import parse_serving
from app.models import MAX_ID, ModelAlias, ModelVersion
from app.web import serializers
from app.web.api import api
from app.web.auth import current_user
from app.web.context import db, settings


def _version_number(body: Any) -> int:
    if not isinstance(body, dict):
        raise SpecError.at("(body)", "the request body must be a JSON object like {\"version\": 3}")
    number = body.get("version")
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_ID:
        raise SpecError.at("version", "expected a version number (a positive integer)")
    return number


def _model(name: str, versions: list[ModelVersion], aliases: dict[str, ModelVersion],
           stored: list[ModelAlias]) -> dict[str, Any]:
    names: dict[int, list[str]] = {}
    for alias, target in aliases.items():
        names.setdefault(target.id, []).append(alias)
    return {
        "name": name,
        "aliases": {alias: target.version for alias, target in aliases.items()},
        "alias_serving": {a.alias: serializers.alias_serving(a) for a in stored if a.alias in aliases},
        "versions": [{**serializers.model_version(v), "aliases": names.get(v.id, [])} for v in versions],
    }


def _described(name: str) -> dict[str, Any]:
    versions, aliases = model_registry.describe(session=db(), owner=current_user(), name=name)
    return _model(name, versions, aliases, model_registry.aliases_of(session=db(), owner=current_user(), name=name))


@api.get("/models/<name>")
def get_model(name: str):
    """A model's live versions (newest first, each with its lineage, input schema and serving
    settings), its aliases, and each stored alias's serving settings."""
    return jsonify(_described(name))


@api.get("/models/<name>/versions/<int:number>")
def get_model_version(name: str, number: int):
    """One live version."""
    found = model_registry.version(session=db(), owner=current_user(), name=name, number=number)
    return jsonify(serializers.model_version(found))


@api.put("/models/<name>/aliases/<alias>")
def put_model_alias(name: str, alias: str):
    """Point an alias at a version (``{"version": N}``), creating or moving it; an optional
    ``"serving": {"max_batch_size", "max_delay_ms", "warm"}`` replaces its serving settings."""
    session = db()
    body = request.get_json(silent=True)
    number = _version_number(body)
    extra = sorted(set(body) - {"version", "serving"})
    if extra:
        raise SpecError.at(extra[0], "unknown field (an alias takes \"version\" and \"serving\")")
    serving = parse_serving(body["serving"], alias=True, prefix="serving") if "serving" in body else None
    model_registry.set_alias(session=session, owner=current_user(), name=name, alias=alias, number=number,
                             serving=serving)
    answer = _described(name)
    session.commit()
    return jsonify(answer)


@api.put("/models/<name>/versions/<int:number>/serving")
def put_model_version_serving(name: str, number: int):
    """Replace a version's micro-batch limits (``{"max_batch_size": N, "max_delay_ms": M}``; null or
    left out: the global setting)."""
    # The version first: another user's model is missing (404) whatever the body holds.
    model_registry.version(session=db(), owner=current_user(), name=name, number=number)
    serving = parse_serving(request.get_json(silent=True), alias=False)
    found = model_registry.set_serving(session=db(), owner=current_user(), name=name, number=number, serving=serving)
    answer = serializers.model_version(found)
    db().commit()
    return jsonify(answer)


@api.delete("/models/<name>/aliases/<alias>")
def delete_model_alias(name: str, alias: str):
    """Remove an alias (``latest`` cannot be removed: it is not stored)."""
    model_registry.remove_alias(session=db(), owner=current_user(), name=name, alias=alias)
    db().commit()
    return Response(status=204)


@api.delete("/models/<name>/versions/<int:number>")
def delete_model_version(name: str, number: int):
    """Delete a version; 409 while an alias points at it or a queued or running job uses it."""
    deleted = model_registry.delete_version(session=db(), owner=current_user(), name=name, number=number)
    digest = model_registry.checkpoint_digest(session=db(), model=deleted)
    db().commit()
    model_signals.announce_deleted(settings(), digest)  # every prediction worker drops it from its cache
    return Response(status=204)
