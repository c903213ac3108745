"""Per-token API rate limits (Flask-Limiter, counted in Redis) with separate read and write budgets.

Every ``/api/v1`` request counts against its caller's read budget (GET, HEAD, OPTIONS) or write
budget (the rest), keyed by its bearer token (a signed-in browser: its user; otherwise the
address). Answers carry ``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset``
(seconds until the window resets); a spent budget answers 429 problem+json with ``Retry-After``.
"""

from __future__ import annotations

import hashlib
import threading
import time

from flask import Flask, Response, request
from flask_limiter import Limiter
from limits.storage import RedisStorage

from app.settings import Settings
from app.web.auth import SAFE_METHODS
from app.web.context import settings

RESET_HEADER = "RateLimit-Reset"
# How long after a hit its own thread reads the window from the hit instead of from Redis.
HIT_FRESH_SECONDS = 1.0


class HitWindowRedisStorage(RedisStorage):
    """The Redis storage of ``limits`` whose hit (INCRBY, EXPIRE on a new window) also returns the
    window's TTL, so the same request's ``RateLimit-*`` headers read the count and reset from the hit
    instead of asking Redis twice more (GET and TTL): one round trip per request, not three.
    Registered as the ``kiln+redis`` scheme (``kiln+`` and any Redis URL)."""

    STORAGE_SCHEME = ["kiln+redis", "kiln+rediss", "kiln+redis+unix"]
    SCRIPT_INCR_WINDOW = """
local current = redis.call("incrby", KEYS[1], tonumber(ARGV[2]))
if tonumber(current) == tonumber(ARGV[2]) then
    redis.call("expire", KEYS[1], ARGV[1])
end
return {current, redis.call("ttl", KEYS[1])}
"""
    _last_hit = threading.local()

    def __init__(self, uri: str, **options) -> None:
        super().__init__(uri.removeprefix("kiln+"), **options)

    def initialize_storage(self, uri: str) -> None:
        """Register the scripts of ``limits`` and the hit-with-window one."""
        super().initialize_storage(uri)
        self.lua_incr_window = self.get_connection().register_script(self.SCRIPT_INCR_WINDOW)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Count a hit; this thread remembers the window's count and expiry for a moment."""
        count, ttl = self.lua_incr_window([self.prefixed_key(key)], [expiry, amount])
        self._last_hit.window = (key, int(count), time.time() + max(int(ttl), 0), time.monotonic())
        return int(count)

    def _hit(self, key: str) -> tuple | None:
        window = getattr(self._last_hit, "window", None)
        if window is None or window[0] != key or time.monotonic() - window[3] > HIT_FRESH_SECONDS:
            return None
        return window

    def get(self, key: str) -> int:
        """The window's count: from this thread's hit just now, else from Redis."""
        window = self._hit(key)
        return window[1] if window is not None else super().get(key)

    def get_expiry(self, key: str) -> float:
        """When the window resets: from this thread's hit just now, else from Redis."""
        window = self._hit(key)
        return window[2] if window is not None else super().get_expiry(key)


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
    limiter = Limiter(caller_key, app=app, storage_uri="kiln+" + config.redis_url, strategy="fixed-window",
                      key_prefix="kiln-rl")
    limiter.shared_limit(lambda: settings().rate_limit_read, scope="api-read",
                         exempt_when=lambda: request.method not in SAFE_METHODS or not settings().rate_limit_read)(api)
    limiter.shared_limit(lambda: settings().rate_limit_write, scope="api-write",
                         exempt_when=lambda: request.method in SAFE_METHODS or not settings().rate_limit_write)(api)
    app.extensions["kiln_limiter"] = limiter
