"""Browser sign-in: Flask-Login sessions, CSRF, the role guards shared by pages and API, sign-in throttling."""

from __future__ import annotations

import functools
import logging
import os
from urllib.parse import urlsplit

import redis as redis_lib
from flask import Flask, abort, g, redirect, request, url_for
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from flask_login import LoginManager, UserMixin, current_user
from flask_wtf.csrf import CSRFProtect

from app.accounts import can_write, get_active_user
from app.models import User
from app.web.auth import load_user
from app.web.context import db, settings
from app.web.problems import problem

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# API writes any role may reach (app/web/api_accounts.py): a viewer manages their own tokens, and the
# users routes answer 404 to every non-admin themselves (a viewer's 403 would say the route exists).
SELF_GUARDED_ENDPOINTS = frozenset({"api.create_token", "api.revoke_token", "api.create_user", "api.update_user"})
# Failed sign-ins allowed per client address and email in one window before /login answers 429.
LOGIN_FAILURES_ALLOWED = 5
LOGIN_FAILURE_WINDOW_SECONDS = 60

log = logging.getLogger(__name__)
login_manager = LoginManager()
csrf = CSRFProtect()


class WebUser(UserMixin):
    """The signed-in user as Flask-Login sees it; ``.user`` is the row in this request's session."""

    def __init__(self, user: User):
        self.user = user
        self.id = user.id

    @property
    def is_active(self) -> bool:
        """A disabled user's session stops working at the next request."""
        return self.user.active


@login_manager.user_loader
def _load(user_id: str) -> WebUser | None:
    if not user_id.isdigit():
        return None
    user = get_active_user(session=db(), user_id=int(user_id))
    return WebUser(user) if user is not None else None


@login_manager.unauthorized_handler
def _unauthorized():
    target = url_for("pages.login", next=request.full_path.rstrip("?"))
    if request.headers.get("HX-Request"):
        # An htmx poll after the session ended: send the whole page to sign-in, not a form into a table row.
        return "", 204, {"HX-Redirect": target}
    return redirect(target)


class SessionCookies(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, opened for free when the request sends no session cookie (every
    bearer-token API call): no signing serializer is built just to find there is nothing to read."""

    def open_session(self, app: Flask, request) -> SecureCookieSession | None:
        """An empty session without a cookie, else Flask's."""
        if self.get_cookie_name(app) not in request.cookies and app.secret_key:
            return self.session_class()
        return super().open_session(app, request)


def register(app: Flask) -> None:
    """Sessions (cookie flags, optional ProxyFix), CSRF on every form but the bearer-token API, Flask-Login."""
    production = os.environ.get("KILN_ENV", "").lower() == "production"
    # Flask already has defaults for these keys, so they are set here, not with setdefault.
    app.config.update(
        SESSION_COOKIE_NAME="kiln_session", SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=production or os.environ.get("KILN_SESSION_COOKIE_SECURE", "") in ("1", "true"),
        # The token is bound to the session; an hour's limit would break a job page left open over lunch.
        WTF_CSRF_TIME_LIMIT=None,
    )
    if hops := int(os.environ.get("KILN_PROXY_FIX", "0") or 0):
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
    from app.web.api import api

    app.session_interface = SessionCookies()
    csrf.init_app(app)
    csrf.exempt(api)  # bearer tokens are not sent by browsers on their own; cookies never authorize API writes
    login_manager.init_app(app)
    login_manager.login_view = "pages.login"
    login_manager.session_protection = "basic"


def api_user():
    """API ``before_request``: a browser's signed-in session may read (GET/HEAD); everything else needs a token.

    Writes never accept the cookie, so the bearer-token API needs no CSRF token and a forged
    cross-site form cannot act through it.
    """
    if request.method in SAFE_METHODS and "Authorization" not in request.headers and current_user.is_authenticated:
        g.user = current_user.user
        return None
    return load_user()


def api_write_guard():
    """API ``before_request`` after authentication: a disabled user gets 403, a viewer 403 on every write."""
    user: User = g.user
    if not user.active:
        return problem(403, "Forbidden", "this account is disabled")
    if request.method not in SAFE_METHODS and not can_write(user) and request.endpoint not in SELF_GUARDED_ENDPOINTS:
        return problem(403, "Forbidden", f"the {user.role} role may read but not change anything")
    return None


def web_user() -> User:
    """The signed-in user's row (views behind ``login_required`` only)."""
    return current_user.user


def writer_required(view):
    """Like ``login_required``, and the user may change things (not a viewer): else 403."""

    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if not current_user.is_authenticated:
            return login_manager.unauthorized()
        if not can_write(current_user.user):
            abort(403)
        return view(*args, **kwargs)

    return wrapped


def admin_required(view):
    """Like ``login_required``, and the user is an admin: anyone else gets 404 (the page does not exist for them)."""

    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if not current_user.is_authenticated:
            return login_manager.unauthorized()
        if not current_user.user.is_admin:
            abort(404)
        return view(*args, **kwargs)

    return wrapped


def safe_next(target: str | None) -> str | None:
    """``target`` if it is a path on this site, else None (no open redirect through ``?next=``)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    if any(ord(c) < 32 for c in target):
        return None
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else None


@functools.lru_cache(maxsize=8)
def _redis(url: str) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def _failure_key(email: str) -> str:
    return f"kiln:login-failures:{request.remote_addr}:{email.strip().lower()[:320]}"


def sign_in_throttled(email: str) -> bool:
    """Whether this address has failed to sign in as ``email`` too often in the current window."""
    try:
        count = _redis(settings().redis_url).get(_failure_key(email))
    except redis_lib.RedisError:
        log.warning("event=login_throttle_unavailable")  # fail open: Redis down must not lock everyone out
        return False
    return count is not None and int(count) >= LOGIN_FAILURES_ALLOWED


def record_failed_sign_in(email: str) -> None:
    """Count a failed sign-in for this address and email."""
    key = _failure_key(email)
    try:
        pipe = _redis(settings().redis_url).pipeline()
        pipe.set(key, 0, ex=LOGIN_FAILURE_WINDOW_SECONDS, nx=True)  # the window starts at the first failure
        pipe.incr(key)
        pipe.execute()
    except redis_lib.RedisError:
        log.warning("event=login_throttle_unavailable")
