"""Per-token API rate limits (Flask-Limiter, counted in Redis) with separate read and write budgets.

Every ``/api/v1`` request counts against its caller's read budget (GET, HEAD, OPTIONS) or write
budget (the rest), keyed by its bearer token (a signed-in browser: its user; otherwise the
address). Answers carry ``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset``
(seconds until the window resets); a spent budget answers 429 problem+json with ``Retry-After``.

A revalidating poll (a GET with ``If-None-Match`` to a view that decides 304s from a version) is
counted only once it turns out to need a body, just before the body is built; a 304 costs no
budget and no Redis round trip (as GitHub's API does not count 304s against its rate limit).
"""

from __future__ import annotations

import functools
import hashlib
import time

from flask import Flask, Response, current_app, g, has_request_context, request
from flask_limiter import Limiter, RateLimitExceeded, RequestLimit
from limits import RateLimitItem, parse_many
from limits.storage import RedisStorage
from limits.strategies import STRATEGIES, FixedWindowRateLimiter
from limits.util import WindowStats

from app.settings import Settings
from app.web.auth import SAFE_METHODS
from app.web.context import settings

RESET_HEADER = "RateLimit-Reset"
STRATEGY = "kiln-fixed-window"
# limits' own fixed-window script (incr_expire.lua), answering the key's time to live as well.
_HIT_AND_TTL = """
local amount = tonumber(ARGV[2])
local current = redis.call("incrby", KEYS[1], amount)
if tonumber(current) == amount then
    redis.call("expire", KEYS[1], ARGV[1])
end
return {current, redis.call("ttl", KEYS[1])}
"""


class OneTripFixedWindow(FixedWindowRateLimiter):
    """limits' fixed window, in one Redis round trip per request: the hit answers the count and the
    time to live, and the rate-limit headers read them from the request instead of asking Redis
    twice more (a GET and a TTL) after the view."""

    _script = None

    def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        """Count the hit; remember the window it leaves for this request's headers."""
        if not isinstance(self.storage, RedisStorage) or not has_request_context():
            return super().hit(item, *identifiers, cost=cost)
        key = item.key_for(*identifiers)
        if self._script is None:
            self._script = self.storage.get_connection().register_script(_HIT_AND_TTL)  # runs as EVALSHA
        count, ttl = self._script([self.storage.prefixed_key(key)], [item.get_expiry(), cost])
        windows = g.setdefault("kiln_rate_windows", {})
        windows[key] = WindowStats(max(int(ttl), 0) + time.time(), max(0, item.amount - int(count)))
        return int(count) <= item.amount

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        """The window this request's hit left, else Redis's."""
        if has_request_context():
            window = g.get("kiln_rate_windows", {}).get(item.key_for(*identifiers))
            if window is not None:
                return window
        return super().get_window_stats(item, *identifiers)


STRATEGIES.setdefault(STRATEGY, OneTripFixedWindow)

# The API views that decide a conditional GET through ``app.web.api._not_modified`` before any body
# (or any other work) is built: only these defer a revalidating read's count.
CONDITIONAL_VIEWS = frozenset({"api.list_jobs", "api.get_job", "api.job_metrics", "api.admin_overview"})


def _read_deferred() -> bool:
    """Whether this request's read budget is counted later, by :func:`count_deferred_read`."""
    if "kiln_read_deferred" not in g:
        g.kiln_read_deferred = (request.method == "GET" and request.endpoint in CONDITIONAL_VIEWS
                                and "If-None-Match" in request.headers)
    return g.kiln_read_deferred


def count_deferred_read() -> None:
    """Count a deferred read that is about to build its body (429 when its budget is spent); a
    no-op for any other request."""
    if g.get("kiln_read_deferred"):
        g.kiln_read_deferred = False  # from now on the read limit applies to this request
        limiter = current_app.extensions["kiln_limiter"]
        limiter._check_request_limit(in_middleware=False)  # noqa: SLF001 - Flask-Limiter's own check, run late


def _check_unless_deferred(limiter: Limiter) -> None:
    # Flask-Limiter's before_request hook, for every request but a deferred read; an API write's
    # one budget is counted directly (:func:`_count_write`) when nothing else could apply.
    if request.method not in SAFE_METHODS and _count_write(limiter):
        return
    if not _read_deferred():
        limiter._check_request_limit()  # noqa: SLF001


def _headers_unless_uncounted(inject_headers, response: Response) -> Response:
    # Flask-Limiter's after_request hook, for every response but a deferred read's that was never counted.
    if g.get("kiln_read_deferred"):
        return response
    return inject_headers(response)


WRITE_SCOPE = "api-write"


@functools.lru_cache(maxsize=16)
def _write_limits(limit: str) -> tuple[RateLimitItem, ...]:
    return tuple(sorted(parse_many(limit)))


def _count_write(limiter: Limiter) -> bool:
    """Count an API write against its caller's shared write budget as Flask-Limiter would (same keys,
    same hits, same ``RateLimit-*`` headers), without its per-request resolution of every limit,
    scope and exemption (about a fifth of a millisecond of CPU per submit). True when counted and
    within budget, or when the write budget is off; False leaves the request to Flask-Limiter's own
    check: a request outside the API, a limiter with filters or on its fallback storage, and a spent
    budget (its 429 is Flask-Limiter's, built by its check, which counts that refused request again
    in a window already past its limit)."""
    if (request.blueprint != "api" or not (limiter.enabled and limiter.initialized)
            or limiter._request_filters or limiter._storage_dead):  # noqa: SLF001
        return False
    budget = settings().rate_limit_write
    if not budget:
        return True  # exempt, as the shared limit's exempt_when says: no count, no headers
    args = [limiter._key_prefix, caller_key(), WRITE_SCOPE] if limiter._key_prefix else [caller_key(), WRITE_SCOPE]  # noqa: SLF001
    counted = []
    try:
        for item in _write_limits(budget):
            if not limiter.limiter.hit(item, *args, cost=1):
                return False
            counted.append(RequestLimit(limiter, item, args, False, True))
    except Exception:  # noqa: BLE001 - RATELIMIT_SWALLOW_ERRORS: a Redis outage lets requests pass uncounted
        if not limiter._swallow_errors:  # noqa: SLF001
            raise
        limiter.logger.exception("Failed to rate limit. Swallowing error")
        return True
    limiter.context.view_rate_limit = counted[0] if counted else None
    limiter.context.view_rate_limits = counted
    return True


def _count_unanswered(response: Response) -> Response:
    # A deferred read that ended without a 304 and without reaching its body (a 404, a 422): counted now.
    if g.get("kiln_read_deferred") and response.status_code != 304:
        try:
            count_deferred_read()
        except RateLimitExceeded:
            pass  # the answer is already made (and cheap); the hit is counted all the same
    return response


def caller_key() -> str:
    """Who a request's budget belongs to: its token (hashed), else its signed-in user, else its address."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "token:" + hashlib.sha256(token.strip().encode()).hexdigest()[:32]
    from flask_login import current_user

    if current_user and current_user.is_authenticated:
        return f"user:{current_user.get_id()}"
    return f"addr:{request.remote_addr}"


def _reset_as_seconds(response: Response) -> Response:
    # Flask-Limiter sends the reset as a Unix time; the IETF header means seconds from now.
    value = response.headers.get(RESET_HEADER)
    if value and value.isdigit() and int(value) > 1_000_000_000:
        response.headers[RESET_HEADER] = str(max(0, int(value) - int(time.time())))
    return response


def register(app: Flask, config: Settings) -> None:
    """Count ``/api/v1`` requests per caller in Redis at ``redis_url``; call before the API blueprint registers."""
    from app.web.api import api

    # Runs after Flask-Limiter's header injection (after_request functions run in reverse order).
    app.after_request(_reset_as_seconds)
    app.config.setdefault("RATELIMIT_HEADERS_ENABLED", True)
    app.config.setdefault("RATELIMIT_HEADER_LIMIT", "RateLimit-Limit")
    app.config.setdefault("RATELIMIT_HEADER_REMAINING", "RateLimit-Remaining")
    app.config.setdefault("RATELIMIT_HEADER_RESET", RESET_HEADER)
    app.config.setdefault("RATELIMIT_HEADER_RETRY_AFTER", "Retry-After")
    app.config.setdefault("RATELIMIT_HEADER_RETRY_AFTER_VALUE", "delta-seconds")
    # A Redis outage must not take the API down with it: requests pass uncounted meanwhile.
    app.config.setdefault("RATELIMIT_SWALLOW_ERRORS", True)
    limiter = Limiter(caller_key, app=app, storage_uri=config.redis_url, strategy=STRATEGY,
                      key_prefix="kiln-rl")
    limiter.shared_limit(lambda: settings().rate_limit_read, scope="api-read",
                         exempt_when=lambda: request.method not in SAFE_METHODS or not settings().rate_limit_read)(api)
    limiter.shared_limit(lambda: settings().rate_limit_write, scope=WRITE_SCOPE,
                         exempt_when=lambda: request.method in SAFE_METHODS or not settings().rate_limit_write)(api)
    # A deferred read skips Flask-Limiter's check altogether until count_deferred_read: not only its
    # Redis hit, also resolving (and exempting) the limits, which costs a 304 a tenth of its time.
    checks = app.before_request_funcs[None]
    checks[checks.index(limiter._check_request_limit)] = functools.partial(_check_unless_deferred, limiter)  # noqa: SLF001
    # Its after-request step (deductions, then headers) finds nothing to do for a deferred read never
    # counted (a 304: no limit was checked), and resolving its request context costs a 304 a tenth of its CPU.
    hooks = app.after_request_funcs[None]
    for index, hook in enumerate(hooks):
        if isinstance(hook, functools.partial) and hook.func is Limiter._Limiter__inject_headers:  # noqa: SLF001
            hooks[index] = functools.partial(_headers_unless_uncounted, hook)
    app.extensions["kiln_limiter"] = limiter
    # Registered after Flask-Limiter's header injection, so it runs before it and its count shows there.
    app.after_request(_count_unanswered)
