"""The ``Idempotency-Key`` header on the API's creating POSTs (jobs, datasets, tokens, users).

A view calls :func:`replay` with its request's fingerprint before it creates anything: a repeat
gets the first answer back (status, body, ``Location``); an ``after_request`` hook stores the
answer of a first run. A 5xx, a 409 or a 429 is not stored: the key is released for a retry.
"""

from __future__ import annotations

import functools
import hashlib
import json

from flask import Response, g, request

from app import idempotency
from app.jobs.errors import SpecError
from app.web.auth import current_user
from app.web.context import db
from app.web.problems import problem

HEADER = "Idempotency-Key"
NOT_STORED = frozenset({409, 429})


def fingerprint(*parts: object) -> str:
    """sha256 of the method, the path and the request's parts, in a canonical JSON form."""
    text = json.dumps([request.method, request.path, *parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def replay(*parts: object) -> Response | None:
    """The stored answer when this request's ``Idempotency-Key`` was seen (None: go on, and it is recorded)."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not key or len(key) > idempotency.MAX_KEY_LENGTH or not key.isascii():
        raise SpecError.at(HEADER, f"must be 1 to {idempotency.MAX_KEY_LENGTH} ASCII characters")
    user = current_user()
    try:
        answer = idempotency.claim(session=db(), user_id=user.id, key=key, fingerprint=fingerprint(*parts))
    except idempotency.KeyReused as exc:
        return problem(422, None, str(exc), kind="idempotency-key-reuse")
    except idempotency.KeyInProgress as exc:
        return problem(409, None, str(exc), kind="idempotency-key-in-progress")
    if answer is None:
        g.idempotency = (user.id, key)
        return None
    response = Response(answer.body, status=answer.status, content_type=answer.content_type)
    if answer.location:
        response.headers["Location"] = answer.location
    response.headers["Idempotent-Replayed"] = "true"
    return response


def json_view(view):
    """Decorate a JSON POST view: its canonical JSON body is the fingerprint."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        replayed = replay(request.get_json(silent=True), kwargs)
        return replayed if replayed is not None else view(*args, **kwargs)

    return wrapper


def store_answer(response: Response) -> Response:
    """``after_request``: store the answer under the claimed key (or release the key)."""
    claimed = g.pop("idempotency", None)
    if claimed is None:
        return response
    user_id, key = claimed
    session = db()
    session.rollback()  # whatever the view left uncommitted is not part of its answer
    keep = response.status_code < 500 and response.status_code not in NOT_STORED and not response.is_streamed
    answer = idempotency.StoredAnswer(response.status_code, response.get_data(), response.content_type,
                                      response.headers.get("Location")) if keep else None
    idempotency.complete(session=session, user_id=user_id, key=key, answer=answer)
    return response
