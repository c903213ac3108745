"""A revalidating poll's bearer token and version in one statement, without an ORM session.

A poll that sends ``If-None-Match`` to ``GET /api/v1/jobs``, ``/jobs/<id>`` or ``/jobs/<id>/metrics``
is usually answered 304, and its time is then almost all fixed cost: resolving the token, reading
the version, opening and closing a session. Here one Core statement on a pooled connection (no
``Session``, no ORM objects) reads both: the live token and its active owner, joined to the version
the view would compute for that owner (the same columns as :func:`app.jobs.service.job_version`,
:func:`~app.jobs.service.metrics_version` and :func:`~app.jobs.service.job_list_version`, scoped
the same way: an admin sees every job, anyone else only their own).

It answers only the plain case: a token found, unexpired, whose use needs no recording now, and
(for a job's paths) a job its owner may see. Anything else (unknown, revoked or expired token, a
disabled user, a use to record, a missing or foreign job) returns None and the request takes the
ordinary path, which answers it exactly as before (401, 404, the use's UPDATE). So a revocation
applies at the next request, as without this path, and a foreign job stays a 404.
"""

from __future__ import annotations

from typing import Any

from flask import g, request
from sqlalchemy import and_, bindparam, case, func, or_, select

from app.accounts import _TOKEN_OWNER, TOKEN_USE_RESOLUTION, detached_user, hash_token
from app.jobs import service
from app.models import Job, JobListVersion, Metric, User, utcnow
from app.web.context import poll_bind

_PREFETCHED = "kiln_prefetched_version"
_ADMIN = User.role == "admin"  # User.is_admin, in SQL
_TOKEN_COLUMNS = len(_TOKEN_OWNER.selected_columns)


def _with_job(*version):
    # The job joined only if this token's owner may see it: a foreign job reads as a missing one.
    visible = and_(Job.id == bindparam("job_id"), or_(_ADMIN, Job.owner_id == User.id))
    return _TOKEN_OWNER.outerjoin(Job, visible).add_columns(Job.id, *version)


def _newest_metric(scoped: bool):
    # service.metrics_version's subquery, correlated to the joined job.
    where = [Metric.job_id == Job.id] + ([Metric.scope == bindparam("scope")] if scoped else [])
    return select(func.max(Metric.id)).where(*where).scalar_subquery()


# Built once per view (and metric scope), so a poll pays neither for building nor for compiling them.
_JOB = _with_job(*service._VERSION[0].selected_columns)  # noqa: SLF001 - the very version job_version reads
_METRICS = {scoped: _with_job(_newest_metric(scoped)) for scoped in (False, True)}
_LIST = _TOKEN_OWNER.add_columns(
    select(func.coalesce(func.sum(JobListVersion.version), 0))
    .where(JobListVersion.owner_id == case((_ADMIN, 0), else_=User.id)).scalar_subquery())


def _statement() -> tuple[Any, dict[str, Any]] | None:
    """This request's combined statement and its parameters, or None if it has none."""
    endpoint = request.endpoint
    if endpoint == "api.list_jobs":
        return _LIST, {}
    if endpoint == "api.get_job":
        return _JOB, {"job_id": request.view_args["job_id"]}
    if endpoint == "api.job_metrics":
        scope = request.args.get("scope") or None
        return _METRICS[bool(scope)], {"job_id": request.view_args["job_id"], **({"scope": scope} if scope else {})}
    return None


def authenticate(token: str) -> User | None:
    """The token's owner (detached: :func:`app.web.context.db` attaches it to the request's session
    if one opens) with this request's version kept for :func:`version`, or None for the ordinary path."""
    if request.method != "GET" or not request.if_none_match or not token or len(token) > 200:
        return None
    found = _statement()
    if found is None:
        return None
    stmt, params = found
    params["sha256"] = hash_token(token)
    with poll_bind().connect() as connection:
        row = connection.execute(stmt, params).first()
    if row is None:
        return None  # unknown, revoked, or a disabled owner: 401 on the ordinary path
    token_id, expires_at, last_used_at, user_id, email, role, active, created_at = row[:_TOKEN_COLUMNS]
    now = utcnow()
    if expires_at is not None and expires_at <= now:
        return None
    if last_used_at is None or now - last_used_at >= TOKEN_USE_RESOLUTION:
        return None  # a use to record: the ordinary path writes it
    version = tuple(row[_TOKEN_COLUMNS:])
    if request.endpoint == "api.list_jobs":
        value = version[0]
    elif version[0] is None:
        return None  # no such job, or not theirs: the ordinary path answers 404
    else:
        value = version[1:] if request.endpoint == "api.get_job" else version[1]
    user = detached_user(id=user_id, email=email, role=role, active=active, created_at=created_at)
    g.setdefault(_PREFETCHED, {})[request.endpoint] = value
    return user


def version(compute):
    """The version :func:`authenticate` read with the token for this request's view, else ``compute()``."""
    prefetched = g.get(_PREFETCHED)
    if prefetched and request.endpoint in prefetched:
        return prefetched.pop(request.endpoint)
    return compute()
