"""RFC 9457 problem details for the API: every error is ``application/problem+json`` with a stable ``type``.

Each kind of error has one entry in :data:`PROBLEM_TYPES`; its ``type`` is the relative URI
``/problems/<slug>``, which this app also serves as a short page saying what the error means.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, abort, json, render_template_string, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

from app.jobs.errors import Conflict, InvalidParameter, NotFound, SpecError
from app.quotas import QuotaExceeded
from app.jobs.states import InvalidTransition
from app.models import MAX_ID

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "/problems/"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProblemType:
    """One kind of error: its slug (the end of its ``type`` URI), HTTP status, title and meaning."""

    slug: str
    status: int
    title: str
    description: str

    @property
    def uri(self) -> str:
        """The ``type`` member of a problem of this kind."""
        return PROBLEM_BASE + self.slug


PROBLEM_TYPES: dict[str, ProblemType] = {t.slug: t for t in (
    ProblemType("bad-request", 400, "Bad Request",
                "The request could not be read (malformed syntax or headers)."),
    ProblemType("unauthorized", 401, "Unauthorized",
                "No valid API token: send 'Authorization: Bearer <token>'."),
    ProblemType("forbidden", 403, "Forbidden",
                "The caller may not do this: a viewer or a disabled account, or a role that lacks the right."),
    ProblemType("not-found", 404, "Not Found",
                "No such resource or route. Another user's resource answers the same as a missing one."),
    ProblemType("method-not-allowed", 405, "Method Not Allowed",
                "The route exists but not with this method; the Allow header lists the methods it takes."),
    ProblemType("conflict", 409, "Conflict",
                "The request does not fit the resource's current state (e.g. cancelling a finished job)."),
    ProblemType("payload-too-large", 413, "Request Entity Too Large",
                "The request body is larger than the configured limit: KILN_MAX_JSON_BYTES for a JSON body, "
                "KILN_MAX_UPLOAD_BYTES for an upload."),
    ProblemType("storage-quota-exceeded", 413, "Storage quota exceeded",
                "The file would take the account's stored bytes (checkpoints and datasets) past its quota; "
                "quota, limit and used say which and how much."),
    ProblemType("quota-exceeded", 429, "Quota exceeded",
                "The account is at a quota (queued + running jobs, or compute seconds today); "
                "quota, limit and used say which and how much."),
    ProblemType("rate-limited", 429, "Too Many Requests",
                "The token made more requests than its rate limit allows; Retry-After says when to try again."),
    ProblemType("idempotency-key-reuse", 422, "Idempotency key reused",
                "The Idempotency-Key was already used with a different request body; use a new key."),
    ProblemType("idempotency-key-in-progress", 409, "Idempotency key in progress",
                "A request with this Idempotency-Key is still being processed; retry it shortly."),
    ProblemType("unsupported-media-type", 415, "Unsupported Media Type",
                "The request body's Content-Type is not one this endpoint reads."),
    ProblemType("invalid-spec", 422, "Invalid job specification",
                "The request body (a job spec, an upload or a form) failed validation; "
                "errors[] names each field at fault and why."),
    ProblemType("invalid-parameter", 422, "Invalid query parameter",
                "A query parameter is malformed or out of range; errors[] names it."),
    ProblemType("internal-error", 500, "Internal Server Error",
                "An unexpected error. Nothing about it is in the answer; quote its error_id, "
                "which the server logged with the details."),
    ProblemType("http-error", 0, "HTTP error",
                "Any other HTTP error; status and title say which."),
)}
_BY_STATUS = {t.status: t for t in PROBLEM_TYPES.values() if t.slug not in (
    "invalid-parameter", "http-error", "storage-quota-exceeded", "quota-exceeded", "idempotency-key-reuse",
    "idempotency-key-in-progress")}


def problem(status: int, title: str | None = None, detail: str | None = None, *, kind: str | None = None,
            **extra: Any) -> Response:
    """A problem+json response; ``kind`` (a :data:`PROBLEM_TYPES` slug) defaults to the status's usual one."""
    ptype = PROBLEM_TYPES[kind] if kind else _BY_STATUS.get(status, PROBLEM_TYPES["http-error"])
    body: dict[str, Any] = {
        "type": ptype.uri, "title": title or ptype.title, "status": status, "detail": detail or ptype.description,
    }
    body.update(extra)
    return Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)


class IdConverter(IntegerConverter):
    """An ``<int:...>`` path segment: ASCII digits; a number beyond the id column's range is id 0.

    Unicode digits (which ``\\d`` would match) match no route. A number too large for the column
    becomes 0, an id no row has (ids start at 1), so it answers 404 exactly like any missing id —
    after authentication, as a missing id does — instead of failing in the database driver. (A
    converter that refused it instead would make Werkzeug answer 405 for a DELETE on a path that
    also has a GET route.)
    """

    regex = r"[0-9]+"

    def to_python(self, value: str) -> int:
        """The id, or 0 when it cannot be a row's id."""
        if len(value) > len(str(MAX_ID)) or int(value) > MAX_ID:
            return 0
        return int(value)


def register_converters(app: Flask) -> None:
    """``<id:...>`` and the default ``<int:...>`` are bounded ids; call before any blueprint adds rules."""
    app.url_map.converters["id"] = IdConverter
    app.url_map.converters["int"] = IdConverter


def _wants_problem() -> bool:
    return request.path.startswith("/api/")


_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{{ t.title }}</title></head>
<body><h1>{{ t.title }}</h1><p><code>{{ t.uri }}</code> (HTTP {{ t.status or "4xx/5xx" }})</p>
<p>{{ t.description }}</p><p><a href="/api/v1/openapi.json">API document</a></p></body></html>"""


def problem_type_page(slug: str):
    """What a problem ``type`` means: JSON when asked for, else a small HTML page."""
    ptype = PROBLEM_TYPES.get(slug)
    if ptype is None:
        abort(404)
    if request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json":
        return {"type": ptype.uri, "title": ptype.title, "status": ptype.status or None,
                "description": ptype.description}
    return render_template_string(_PAGE, t=ptype)


def register(app: Flask) -> None:
    """Map domain errors and HTTP errors to problem+json, and serve the ``/problems/<slug>`` pages."""
    app.add_url_rule(PROBLEM_BASE + "<slug>", "problem_type", problem_type_page)

    @app.errorhandler(SpecError)
    def _spec_error(exc: SpecError):
        first = exc.errors[0]
        kind = "invalid-parameter" if isinstance(exc, InvalidParameter) else "invalid-spec"
        return problem(422, None, f"{first['field']}: {first['message']}", kind=kind, errors=exc.errors)

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound):
        return problem(404, "Not Found", str(exc), kind="not-found")

    @app.errorhandler(Conflict)
    @app.errorhandler(InvalidTransition)
    def _conflict(exc: Exception):
        return problem(409, "Conflict", str(exc), kind="conflict")

    @app.errorhandler(QuotaExceeded)
    def _quota(exc: QuotaExceeded):
        kind = "storage-quota-exceeded" if exc.status == 413 else "quota-exceeded"
        return problem(exc.status, None, exc.message, kind=kind, quota=exc.quota, limit=exc.limit, used=exc.used)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        if not _wants_problem() or exc.response is not None:
            return exc
        response = problem(exc.code or 500, exc.name, exc.description)
        # Keep what the exception says in headers (Allow on a 405, WWW-Authenticate...), not its body type.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        # The exception's text may hold SQL, paths or data: it goes to the log only, under an id
        # the caller can quote.
        error_id = uuid.uuid4().hex
        log.exception("event=unhandled_error error_id=%s method=%s path=%s", error_id, request.method, request.path)
        if not _wants_problem():
            return Response(f"Internal Server Error (error id {error_id})", status=500, mimetype="text/plain")
        return problem(500, None, f"an unexpected error occurred; it has been logged as error {error_id}",
                       kind="internal-error", error_id=error_id)
