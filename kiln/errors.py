"""Typed errors of the Kiln client, each carrying the server's problem+json detail."""

from __future__ import annotations

from typing import Any


class KilnError(Exception):
    """An error answer from the server (or no answer at all); ``status`` is None when none came."""

    def __init__(self, detail: str, *, status: int | None = None, type: str | None = None,
                 title: str | None = None, errors: list[dict[str, Any]] | None = None,
                 body: dict[str, Any] | None = None):
        super().__init__(detail)
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.body = body or {}

    def __str__(self) -> str:
        head = f"{self.status} {self.title}" if self.status and self.title else (self.title or "error")
        return f"{head}: {self.detail}" if self.detail and self.detail != self.title else head


class KilnConnectionError(KilnError):
    """The server could not be reached, or closed the connection without an answer."""


class Unauthorized(KilnError):
    """401: no valid API token."""


class Forbidden(KilnError):
    """403: the token's user may not do this (a viewer's or a disabled account's write)."""


class NotFound(KilnError):
    """404: no such job, model, dataset or token (or another user's)."""


class Conflict(KilnError):
    """409: the resource's state does not allow it (cancelling a finished job...)."""


class InvalidSpec(KilnError):
    """422: a spec, upload or query parameter failed validation; ``errors`` names the fields."""


class RateLimited(KilnError):
    """429: too many requests, still refused after the client's bounded retries."""

    def __init__(self, detail: str, *, retry_after: float | None = None, **kwargs: Any):
        super().__init__(detail, **kwargs)
        self.retry_after = retry_after


class ServerError(KilnError):
    """5xx: the server failed; the answer carries an ``error_id`` to quote to its operator."""


class WaitTimeout(KilnError):
    """A wait for a job ran past its timeout; the job itself goes on."""


_BY_STATUS: dict[int, type[KilnError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 422: InvalidSpec}


def error_for(status: int, body: dict[str, Any], *, retry_after: float | None = None) -> KilnError:
    """The typed error for an error answer with problem+json ``body`` (or whatever body it had)."""
    detail = str(body.get("detail") or body.get("title") or f"HTTP {status}")
    kwargs: dict[str, Any] = {"status": status, "type": body.get("type"), "title": body.get("title"),
                              "errors": body.get("errors") if isinstance(body.get("errors"), list) else None,
                              "body": body}
    if status == 429:
        return RateLimited(detail, retry_after=retry_after, **kwargs)
    if status >= 500:
        return ServerError(detail, **kwargs)
    return _BY_STATUS.get(status, KilnError)(detail, **kwargs)
