"""RFC 9457 problem details for the API: every error is ``application/problem+json``."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, json, request
from werkzeug.exceptions import HTTPException

from app.jobs.errors import Conflict, NotFound, SpecError
from app.jobs.states import InvalidTransition

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger(__name__)


def problem(status: int, title: str, detail: str | None = None, **extra: Any) -> Response:
    """A problem+json response."""
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)


def _wants_problem() -> bool:
    return request.path.startswith("/api/")


def register(app: Flask) -> None:
    """Map domain errors and HTTP errors to problem+json."""

    @app.errorhandler(SpecError)
    def _spec_error(exc: SpecError):
        first = exc.errors[0]
        return problem(422, "Invalid job specification", f"{first['field']}: {first['message']}", errors=exc.errors)

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound):
        return problem(404, "Not Found", str(exc))

    @app.errorhandler(Conflict)
    @app.errorhandler(InvalidTransition)
    def _conflict(exc: Exception):
        return problem(409, "Conflict", str(exc))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        if not _wants_problem():
            return exc
        return problem(exc.code or 500, exc.name, exc.description)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("event=unhandled_error path=%s", request.path)
        if not _wants_problem():
            return Response("Internal Server Error", status=500)
        return problem(500, "Internal Server Error", "an unexpected error occurred; it has been logged")
