"""The OpenAPI 3.1 document of the JSON API, built from a route table and the pydantic models.

:data:`ROUTES` has one entry per ``(method, Flask rule)`` under ``/api/v1``: its summary, query
parameters, request body and answers. Bodies come from the job spec models (app/jobs/schemas.py)
and the answer models (app/web/resources.py). A route added to the API needs an entry here:
tests/web/test_openapi.py walks ``app.url_map`` and fails on any route the table lacks.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.jobs.schemas import PredictSpec, TrainSpec
from app.jobs.states import STATES
from app.models import MAX_ID
from app.web import resources as r

openapi = Blueprint("openapi", __name__)

PREFIX = "/api/v1"
REF = "#/components/schemas/{model}"
JSON = "application/json"
PROBLEM_JSON = "application/problem+json"


# --- the route table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One documented answer: a model (or a raw schema), its media type and headers."""

    description: str
    model: type[BaseModel] | dict[str, Any] | None = None
    media: str = JSON
    headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Op:
    """One operation: what it does, its query parameters, its body and its answers.

    Problem answers shared by every operation (401, 403, 429; 404 with a path id; 422 with query
    parameters or a body; 400 and 413 with a body) are added by :func:`_operation`; ``errors``
    lists the others (409...).
    """

    summary: str
    answers: dict[int, Answer]
    query: tuple[dict[str, Any], ...] = ()
    body: type[BaseModel] | str | None = None
    errors: tuple[int, ...] = ()
    idempotent: bool = False  # takes an Idempotency-Key header
    cookie: bool = False  # a signed-in browser may call it with its session cookie (reads only)
    description: str = ""
    public: bool = False  # no token needed


def q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A query parameter."""
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def ids(lo: int = 1) -> dict[str, Any]:
    """An id-shaped integer schema."""
    return {"type": "integer", "minimum": lo, "maximum": MAX_ID}


TIME = {"type": "string", "format": "date-time"}
FLAG = {"type": "boolean"}
WAIT = q("wait", {"type": "number", "minimum": 0, "maximum": 3600},
         "seconds to wait for the job to end (capped by KILN_MAX_INLINE_WAIT_SECONDS)")
ETAG = ("ETag",)


def job(description: str = "the job", status_headers: tuple[str, ...] = ()) -> Answer:
    """An answer carrying one job."""
    return Answer(description, r.Job, headers=status_headers)


LIST_JOBS = (
    q("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, "page size"),
    q("cursor", ids(), "the previous page's next_cursor"),
    q("state", {"type": "string", "enum": list(STATES)}, "only jobs in this state"),
    q("kind", {"type": "string", "maxLength": 20}, "train or predict"),
    q("name", {"type": "string", "maxLength": 200}, "a substring of the name, any case"),
    q("created_after", TIME, "created strictly after (no zone: UTC)"),
    q("created_before", TIME, "created strictly before"),
    q("updated_after", TIME, "updated strictly after"),
)
METRICS = (
    q("scope", {"type": "string", "enum": ["epoch", "step", "test"]}, "only reports of this scope"),
    q("after", ids(0), "the previous page's next_after"),
    q("limit", {"type": "integer", "minimum": 1, "maximum": 10000}, "page size (default 1000; 200000 with points)"),
    q("since", TIME, "reports made at or after this time"),
    q("latest", FLAG, "keep only the newest attempt's report of each epoch/step"),
    q("points", {"type": "integer", "minimum": 4, "maximum": 10000}, "answer downsampled curves of at most N points"),
)

# (method, Flask rule under /api/v1) -> its documentation. Add a route's entry here.
ROUTES: dict[tuple[str, str], Op] = {
    ("GET", "/openapi.json"): Op("This document", {200: Answer("the OpenAPI 3.1 document", {"type": "object"})},
                                 public=True),
    ("POST", "/jobs"): Op(
        "Submit a job", {201: job("the recorded job", ("Location",)),
                         200: job("with wait: the job, ended within wait seconds", ("Location",)),
                         202: job("with wait: the job, still queued or running; poll Location", ("Location",))},
        query=(WAIT,), body="JobSpec", errors=(409,), idempotent=True,
        description="429 quota-exceeded when the account is at its active-jobs or compute quota."),
    ("GET", "/jobs"): Op("List jobs, newest first", {200: Answer("a page of jobs", r.JobList, headers=ETAG)},
                         query=LIST_JOBS, cookie=True,
                         description="metadata.<key>=<value> parameters filter on the spec's metadata."),
    ("GET", "/jobs/<int:job_id>"): Op("A job", {200: Answer("the job", r.Job, headers=ETAG)}, cookie=True),
    ("POST", "/jobs/<int:job_id>/cancel"): Op("Cancel a job", {202: job()}, errors=(409,)),
    ("POST", "/jobs/<int:job_id>/retry"): Op("Retry a failed or cancelled job", {202: job()}, errors=(409,)),
    ("POST", "/jobs/<int:job_id>/pause"): Op("Pause a training job", {202: job()}, errors=(409,)),
    ("POST", "/jobs/<int:job_id>/resume"): Op("Resume a paused job", {202: job()}, errors=(409,)),
    ("GET", "/jobs/<int:job_id>/metrics"): Op(
        "Metrics reports, or downsampled curves with points",
        {200: Answer("reports (items) or curves (series)",
                     {"oneOf": [{"$ref": REF.format(model="MetricPage")}, {"$ref": REF.format(model="MetricCurves")}]},
                     headers=ETAG)},
        query=METRICS, cookie=True),
    ("GET", "/jobs/<int:job_id>/events"): Op("A job's events", {200: Answer("events in order", r.EventList)},
                                              cookie=True),
    ("GET", "/jobs/<int:job_id>/checkpoints"): Op("A job's checkpoints",
                                                   {200: Answer("oldest first", r.CheckpointList)}, cookie=True),
    ("GET", "/jobs/<int:job_id>/checkpoints/<int:checkpoint_id>/download"): Op(
        "Download a checkpoint file",
        {200: Answer("the file", {"type": "string", "contentMediaType": "application/octet-stream"},
                     media="application/octet-stream", headers=("Repr-Digest", "Content-Disposition", "ETag"))},
        cookie=True),
    ("GET", "/jobs/<int:job_id>/logs"): Op(
        "A job's log lines, or a Server-Sent Events follow",
        {200: Answer("log lines (JSON), or with follow=true the event stream", r.LogLines)},
        query=(q("tail", {"type": "integer", "minimum": 1, "maximum": 10000}, "keep the last N lines"),
               q("follow", FLAG, "stream new lines as Server-Sent Events until the job ends")),
        cookie=True),
    ("GET", "/jobs/<int:job_id>/stream"): Op(
        "A text generation job's output as Server-Sent Events (start, token, end)",
        {200: Answer("the event stream; ends with an end event when the job ends",
                     {"type": "string"}, media="text/event-stream")},
        cookie=True),
    ("GET", "/jobs/<int:job_id>/output"): Op(
        "A batch-file prediction's JSON Lines output",
        {200: Answer("one JSON line per input row", {"type": "string"}, media="application/x-ndjson",
                     headers=("Content-Disposition",))},
        errors=(409,), cookie=True),
    ("GET", "/jobs/<int:job_id>/webhook-deliveries"): Op(
        "A job's webhook deliveries and their attempts", {200: Answer("oldest first", r.WebhookDeliveryList)},
        cookie=True),
    ("POST", "/models/<path:ref>/predict"): Op(
        "Predict with a model, answered inline when it ends in time",
        {200: job("the finished job; result holds the predictions", ("Location",)),
         202: job("the queued or running job; poll Location", ("Location",))},
        query=(WAIT,), body="InlinePrediction", errors=(409,)),
    ("GET", "/models"): Op("Model versions, newest first", {200: Answer("model versions", r.ModelList)},
                           query=(q("limit", {"type": "integer", "minimum": 1, "maximum": 200}, "at most"),),
                           cookie=True),
    ("GET", "/models/<name>"): Op("A model: its live versions and aliases", {200: Answer("the model", r.Model)},
                                  errors=(404,), cookie=True),
    ("GET", "/models/<name>/versions/<int:number>"): Op(
        "One live version of a model", {200: Answer("the version", r.ModelVersion)}, cookie=True),
    ("PUT", "/models/<name>/aliases/<alias>"): Op(
        "Set or move an alias to a version (and its serving settings)", {200: Answer("the model", r.Model)}, body="AliasRequest",
        errors=(404, 409)),
    ("PUT", "/models/<name>/versions/<int:number>/serving"): Op(
        "Set a version's micro-batch limits", {200: Answer("the version", r.ModelVersion)}, body="ServingRequest"),
    ("DELETE", "/models/<name>/aliases/<alias>"): Op("Remove an alias", {204: Answer("removed")}, errors=(404,)),
    ("DELETE", "/models/<name>/versions/<int:number>"): Op(
        "Delete a version (409 while an alias or a queued or running job uses it)", {204: Answer("deleted")},
        errors=(409,)),
    ("GET", "/pretrained"): Op("The pretrained-model catalog", {200: Answer("catalog entries", r.PretrainedList)},
                               cookie=True),
    ("GET", "/datasets"): Op("Built-in datasets, then the caller's uploads",
                             {200: Answer("datasets", r.DatasetList)}, cookie=True),
    ("POST", "/datasets"): Op("Upload a CSV, JSONL, Parquet or zip file",
                              {201: Answer("the stored dataset with its inferred schema", r.Dataset,
                                           headers=("Location",))},
                              body="DatasetUpload", errors=(409,), idempotent=True),
    ("GET", "/datasets/<int:dataset_id>"): Op("An uploaded dataset with its schema",
                                              {200: Answer("the dataset", r.Dataset)}, cookie=True),
    ("DELETE", "/datasets/<int:dataset_id>"): Op("Delete an upload (file, then row)",
                                                 {204: Answer("deleted")}, errors=(409,)),
    ("GET", "/datasets/<int:dataset_id>/rows"): Op(
        "The first rows of an uploaded dataset", {200: Answer("columns and rows", r.DatasetRows)},
        query=(q("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 20}, "how many rows"),),
        cookie=True),
    ("GET", "/tokens"): Op("Your API tokens", {200: Answer("tokens (never their secrets)", r.TokenList)},
                           cookie=True),
    ("POST", "/tokens"): Op("Create a token; its secret is shown once", {201: Answer("the token", r.CreatedToken)},
                            body="TokenRequest", errors=(409,), idempotent=True),
    ("DELETE", "/tokens/<int:token_id>"): Op("Revoke one of your tokens", {204: Answer("revoked")}),
    ("GET", "/users"): Op("Every user (admins only; 404 for others)", {200: Answer("users", r.UserList)},
                          errors=(404,), cookie=True),
    ("POST", "/users"): Op("Create a user with a first token, shown once (admins only)",
                           {201: Answer("the user and its token", r.CreatedUser, headers=("Location",))},
                           body="UserRequest", errors=(404, 409), idempotent=True),
    ("PATCH", "/users/<int:user_id>"): Op("Set role, active or password (admins only)",
                                          {200: Answer("the user", r.User)}, body="UserUpdate", errors=(404, 409)),
    ("GET", "/admin/overview"): Op("The admin dashboard's data (admins only; 404 for others)",
                                   {200: Answer("the overview", r.Overview)}, errors=(404,), cookie=True),
    ("GET", "/usage"): Op(
        "Compute seconds, jobs and storage per user and job",
        {200: Answer("usage over the range", r.Usage)},
        query=(q("from", TIME, "start of the range"), q("to", TIME, "end of the range (default now)"),
               q("user", ids(), "admins: only this user (404 when there is no such user, or for others)")),
        errors=(404,), cookie=True),
    ("GET", "/webhook-secret"): Op("Your webhook secret's prefix", {200: Answer("prefix and time", r.WebhookSecret)},
                                   cookie=True),
    ("POST", "/webhook-secret"): Op("Create or rotate your webhook signing secret; shown once",
                                    {201: Answer("the secret", r.CreatedWebhookSecret)}),
}

HEADERS: dict[str, dict[str, Any]] = {
    "ETag": {"description": "strong validator; send it back as If-None-Match for a 304",
             "schema": {"type": "string"}},
    "Location": {"description": "the created (or pollable) resource", "schema": {"type": "string"}},
    "Retry-After": {"description": "seconds until the budget resets", "schema": {"type": "integer"}},
    "RateLimit-Limit": {"description": "requests allowed in the window", "schema": {"type": "integer"}},
    "RateLimit-Remaining": {"description": "requests left in the window", "schema": {"type": "integer"}},
    "RateLimit-Reset": {"description": "seconds until the window resets", "schema": {"type": "integer"}},
    "Repr-Digest": {"description": "sha-256=:<base64>: of the file (RFC 9530)", "schema": {"type": "string"}},
    "Content-Disposition": {"description": "attachment; filename=...", "schema": {"type": "string"}},
}
RATE_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")

# Problem answers by status: what each means on this API.
PROBLEMS = {
    400: "the request could not be read",
    401: "no valid token (missing, wrong, revoked, expired, or a disabled user's)",
    403: "a viewer's write, or a disabled account",
    404: "no such resource (another user's answers the same)",
    409: "the resource's state does not allow it, or its Idempotency-Key is still in progress",
    413: "the body is over its limit (KILN_MAX_JSON_BYTES, KILN_MAX_UPLOAD_BYTES) or a storage quota",
    415: "a Content-Type this operation does not read",
    422: "a body or a parameter failed validation: errors[] names each field",
    429: "a rate limit (Retry-After says when to try again) or a quota",
}


# --- building the document ------------------------------------------------------------------


def rule_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: ``/jobs/<int:job_id>`` -> ``/jobs/{job_id}``."""
    return re.sub(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>", r"{\1}", rule)


def _path_parameters(rule: str) -> list[dict[str, Any]]:
    params = []
    for converter, name in re.findall(r"<(?:([a-z]+):)?([A-Za-z_][A-Za-z0-9_]*)>", rule):
        if converter == "path":
            schema = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"^[A-Za-z0-9:@_.\-]+$"}
            about = "a model: a training job id, name@version, name@latest or pretrained:<name>"
        elif converter in ("", "string"):
            schema = {"type": "string", "minLength": 1, "maxLength": 100, "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"}
            about = "a name (a model's, or an alias)"
        else:
            schema = ids(0)
            about = "an id"
        params.append({"name": name, "in": "path", "required": True, "schema": schema, "description": about})
    return params


def _schema(model: type[BaseModel] | dict[str, Any] | None) -> dict[str, Any] | None:
    if model is None:
        return None
    if isinstance(model, dict):
        return model
    return {"$ref": REF.format(model=model.__name__)}


def _headers(names: tuple[str, ...]) -> dict[str, Any]:
    return {name: HEADERS[name] for name in names}


def _problem(status: int) -> dict[str, Any]:
    headers = ("Retry-After",) if status == 429 else ()
    return {"description": PROBLEMS[status], "headers": _headers(headers + RATE_HEADERS),
            "content": {PROBLEM_JSON: {"schema": {"$ref": REF.format(model="Problem")}}}}


def _body(name: str) -> dict[str, Any]:
    if name == "DatasetUpload":
        return {"required": True, "content": {"multipart/form-data": {
            "schema": {"$ref": REF.format(model=name)},
            "encoding": {"file": {"contentType": "application/octet-stream"}}}}}
    return {"required": True, "content": {JSON: {"schema": {"$ref": REF.format(model=name)}}}}


def _operation(method: str, rule: str, op: Op) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, answer in sorted(op.answers.items()):
        entry: dict[str, Any] = {"description": answer.description,
                                 "headers": _headers(answer.headers + ((), RATE_HEADERS)[not op.public])}
        if (schema := _schema(answer.model)) is not None:
            entry["content"] = {answer.media: {"schema": schema}}
        if method == "GET" and "/logs" in rule:
            entry["content"]["text/event-stream"] = {"schema": {"type": "string"}}
        responses[str(status)] = entry
    if "ETag" in [h for a in op.answers.values() for h in a.headers] and method == "GET":
        responses["304"] = {"description": "not modified since the ETag sent in If-None-Match",
                            "headers": _headers(("ETag",) + RATE_HEADERS)}
    operation: dict[str, Any] = {"summary": op.summary, "operationId": f"{method.lower()}{rule_path(rule)}",
                                 "responses": responses}
    if op.description:
        operation["description"] = op.description
    if op.public:
        operation["security"] = []
        return operation
    statuses = {401, 403, 429, *op.errors}
    parameters = list(op.query)
    if "<" in rule:
        statuses.add(404)
    if op.query or op.body:
        statuses.add(422)
    if op.body:
        statuses.update((400, 413, 415))
        operation["requestBody"] = _body(op.body)
    if op.idempotent:
        parameters.append({"name": "Idempotency-Key", "in": "header", "required": False,
                           "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
                           "description": "a repeat with the same key and body gets the first answer back"})
    if parameters:
        operation["parameters"] = parameters
    for status in sorted(statuses):
        responses.setdefault(str(status), _problem(status))
    operation["security"] = [{"bearer": []}, {"cookie": []}] if op.cookie else [{"bearer": []}]
    return operation


ANSWER_MODELS: tuple[type[BaseModel], ...] = (
    r.Job, r.JobSummary, r.JobList, r.MetricPage, r.MetricCurves, r.EventList, r.CheckpointList, r.LogLines,
    r.ModelList, r.Dataset, r.DatasetList, r.DatasetRows, r.Token, r.CreatedToken, r.TokenList, r.User,
    r.CreatedUser, r.UserList, r.WebhookSecret, r.CreatedWebhookSecret, r.WebhookDeliveryList, r.PretrainedList,
    r.Overview, r.Usage, r.Problem, r.TokenRequest, r.UserRequest, r.UserUpdate, r.DatasetUpload,
    r.Model, r.AliasRequest, r.ServingRequest,
)


def _inline_prediction(components: dict[str, Any]) -> dict[str, Any]:
    """PredictSpec without ``kind`` and ``model``: the model is named in the URL."""
    schema = copy.deepcopy(components["PredictSpec"])
    for name in ("kind", "model"):
        schema["properties"].pop(name, None)
    schema["required"] = [n for n in schema.get("required", []) if n not in ("kind", "model")]
    schema["title"] = "InlinePrediction"
    return schema


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    """Build the document once per process."""
    _, schemas = models_json_schema(
        [(TrainSpec, "validation"), (PredictSpec, "validation")]
        + [(m, "serialization" if not m.__name__.endswith(("Request", "Update", "Upload")) else "validation")
           for m in ANSWER_MODELS],
        ref_template=REF,
    )
    components = schemas.get("$defs", {})
    components["JobSpec"] = {"oneOf": [{"$ref": REF.format(model="TrainSpec")},
                                       {"$ref": REF.format(model="PredictSpec")}],
                             "discriminator": {"propertyName": "kind"}}
    components["InlinePrediction"] = _inline_prediction(components)
    paths: dict[str, dict[str, Any]] = {}
    for (method, rule), op in ROUTES.items():
        item = paths.setdefault(rule_path(rule), {})
        if params := _path_parameters(rule):
            item["parameters"] = params
        item[method.lower()] = _operation(method, rule, op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kiln API", "version": "1",
                 "description": "Train and serve PyTorch models. Errors are RFC 9457 problem details; "
                                "see docs/api.md."},
        "servers": [{"url": PREFIX}],
        "components": {"schemas": components,
                       "securitySchemes": {
                           "bearer": {"type": "http", "scheme": "bearer",
                                      "description": "an API token (kiln users create, POST /tokens)"},
                           "cookie": {"type": "apiKey", "in": "cookie", "name": "kiln_session",
                                      "description": "a signed-in browser's session: reads (GET) only"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }


@openapi.get(PREFIX + "/openapi.json")
def openapi_json():
    """The OpenAPI document (no token needed)."""
    return jsonify(document())


_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Kiln API</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><redoc spec-url="{spec}"></redoc><script src="{script}"></script></body></html>"""


@openapi.get("/api/docs")
def api_docs():
    """The API reference page: the document rendered by Redoc from app/web/static/vendor/redoc (no CDN, no token)."""
    page = _DOCS_PAGE.format(spec=PREFIX + "/openapi.json", script="/static/vendor/redoc/redoc.standalone.js")
    return Response(page, mimetype="text/html")
