"""Conditional answers for what the pages poll: an ETag decided before any body is built, then a 304
or the body.

Every version comes from the function the JSON API uses for the same data (``service.job_version``
as ``GET /api/v1/jobs/<id>``, ``overview.version`` as ``GET /api/v1/admin/overview``), with the
API's ETag function, so a page's poll reads the same version columns as the API's (which reads
them in the statement that resolves its token, ``app.web.revalidate``). The answers carry
``Cache-Control: no-cache``: the browser keeps them and revalidates every htmx poll with
``If-None-Match`` on its own; a 304 reaches htmx as the kept 200.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Response, current_app, make_response, session

from app.jobs import overview, service
from app.jobs.service import etag
from app.web.api import _not_modified as not_modified
from app.web.context import db, settings
from app.web.login import web_user

CACHE_CONTROL = "no-cache, private"
WEB = Path(__file__).parent
TEMPLATES = WEB / "templates"


@functools.cache
def build() -> str:
    """A digest of the templates and the web code that fills them: a release that changes how a
    page looks changes its ETags, so no browser keeps showing the old one."""
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted([*TEMPLATES.rglob("*.html"), *WEB.glob("*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def answer(tag: str, body: Callable[[], Any]) -> Response:
    """304 when the request's ``If-None-Match`` already has ``tag``, else ``body()``; both carry the
    ETag and ``Cache-Control: no-cache``. ``body`` is called only for a 200."""
    response = not_modified(tag) or make_response(body())
    response.set_etag(tag)
    response.headers["Cache-Control"] = CACHE_CONTROL
    return response


def job_tag(partial: str, job_id: int) -> str:
    """The ETag of one of a job's polled partials for the signed-in user: the job's version (NotFound
    for a job they may not see), who looks (their role decides the buttons) and the session's CSRF
    token (the buttons' forms carry one signed from it)."""
    user = web_user()
    version = service.job_version(session=db(), user=user, job_id=job_id)
    csrf = session.get(current_app.config.get("WTF_CSRF_FIELD_NAME", "csrf_token"))
    return etag("page", partial, job_id, version, user.id, user.role, csrf, build())


def overview_tag() -> tuple[str, tuple]:
    """The admin overview's ETag and the version it comes from (for :func:`overview.shared_overview`)."""
    version = overview.version(session=db(), settings=settings())
    return etag("overview", version, build()), version


def shared_overview(version: tuple) -> dict[str, Any]:
    """The admin overview as of ``version``, computed once per version in this process."""
    return overview.shared_overview(session=db(), settings=settings(), version=version)
