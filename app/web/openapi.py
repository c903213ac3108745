"""The OpenAPI 3.1 document of the JSON API; job spec schemas come straight from the pydantic models."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from flask import Blueprint, jsonify
from pydantic.json_schema import models_json_schema

from app.jobs.schemas import PredictSpec, TrainSpec

openapi = Blueprint("openapi", __name__)

PROBLEM = {"description": "problem details", "content": {"application/problem+json": {
    "schema": {"$ref": "#/components/schemas/Problem"}}}}


def _op(summary: str, ok: str = "200", body: str | None = None, errors: tuple[int, ...] = ()) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {ok: {"description": "success"}, "401": PROBLEM}}
    for code in errors:
        op["responses"][str(code)] = PROBLEM
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"$ref": body}}}}
    return op


def _param(name: str) -> dict[str, Any]:
    return {"parameters": [{"name": name, "in": "path", "required": True, "schema": {"type": "integer"}}]}


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    """Build the document once per process."""
    _, schemas = models_json_schema(
        [(TrainSpec, "validation"), (PredictSpec, "validation")], ref_template="#/components/schemas/{model}"
    )
    components = schemas.get("$defs", {})
    components["JobSpec"] = {"oneOf": [{"$ref": "#/components/schemas/TrainSpec"},
                                       {"$ref": "#/components/schemas/PredictSpec"}],
                             "discriminator": {"propertyName": "kind"}}
    components["Problem"] = {"type": "object", "properties": {
        "type": {"type": "string", "format": "uri-reference",
                 "description": "/problems/<kind>: stable per kind of error (docs/api.md, Errors)"},
        "title": {"type": "string"}, "status": {"type": "integer"},
        "error_id": {"type": "string", "description": "500 only: the id the server logged the error under"},
        "detail": {"type": "string"}, "errors": {"type": "array", "items": {"type": "object", "properties": {
            "field": {"type": "string"}, "message": {"type": "string"}}}}}}
    job = {"parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "integer"}}]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kiln API", "version": "1"},
        "servers": [{"url": "/api/v1"}],
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/jobs": {"post": _op("Submit a job", "201", "#/components/schemas/JobSpec", errors=(422,)),
                      "get": _op("List jobs, newest first (limit, cursor, state, kind)", errors=(422,))},
            "/jobs/{job_id}": {**job, "get": _op("A job", errors=(404,))},
            "/jobs/{job_id}/cancel": {**job, "post": _op("Cancel", "202", errors=(404, 409))},
            "/jobs/{job_id}/retry": {**job, "post": _op("Retry a failed or cancelled job", "202", errors=(404, 409))},
            "/jobs/{job_id}/pause": {**job, "post": _op("Pause", "202", errors=(404, 409))},
            "/jobs/{job_id}/resume": {**job, "post": _op("Resume a paused job", "202", errors=(404, 409))},
            "/jobs/{job_id}/metrics": {**job, "get": _op("Metrics reports (scope, after, limit)", errors=(404,))},
            "/jobs/{job_id}/events": {**job, "get": _op("Job events", errors=(404,))},
            "/jobs/{job_id}/webhook-deliveries": {**job, "get": _op("Webhook deliveries and their attempts",
                                                                     errors=(404,))},
            "/webhook-secret": {"get": _op("Your webhook secret's prefix"),
                                "post": _op("Create or rotate your webhook signing secret; shown once", "201")},
            "/models": {"get": _op("Model versions")},
            "/datasets": {"get": _op("Built-in and uploaded datasets"),
                          "post": _op("Upload CSV, JSONL or Parquet (multipart field 'file')", "201", errors=(422,))},
            "/datasets/{dataset_id}": {"get": _op("An uploaded dataset with its schema", errors=(404,)),
                                       "delete": _op("Delete an upload (file, then row)", "204", errors=(404, 409)),
                                       "parameters": [{"name": "dataset_id", "in": "path", "required": True,
                                                       "schema": {"type": "integer"}}]},
            "/datasets/{dataset_id}/rows": {**_param("dataset_id"), "get": _op("First rows of an uploaded dataset (limit)", errors=(404, 422))},
            "/tokens": {"get": _op("Your API tokens"),
                        "post": _op("Create a token {name, expires_at?}; the secret is shown once", "201", errors=(422,))},
            "/tokens/{token_id}": {**_param("token_id"), "delete": _op("Revoke one of your tokens", "204", errors=(404,))},
            "/users": {"get": _op("Every user (admins only)", errors=(404,)),
                       "post": _op("Create a user {email, role, password?} (admins only)", "201", errors=(404, 409, 422))},
            "/users/{user_id}": {**_param("user_id"), "patch": _op("Set role, active or password (admins only)", errors=(404, 409, 422))},
            "/admin/overview": {"get": _op("The admin dashboard's data (admins only)", errors=(404,))},
        },
    }


@openapi.get("/api/v1/openapi.json")
def openapi_json():
    """The OpenAPI document (no token needed)."""
    return jsonify(document())
