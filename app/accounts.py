"""Users, roles, passwords and API tokens: creation, password and bearer-token authentication.

Tokens are stored as sha256 (they are random); passwords as scrypt hashes (they are not).
``can_write`` is the one role rule both the API and the pages enforce. The token and user
management services below are what both ``/account``, ``/admin/users`` and ``/api/v1/tokens``,
``/api/v1/users`` call.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy import Engine, bindparam, or_, select, update
from sqlalchemy.orm import Session, configure_mappers, make_transient_to_detached
from werkzeug.security import check_password_hash, generate_password_hash

from app import token_cache
from app.jobs.errors import Conflict, NotFound, SpecError
from app.models import ApiToken, User, utcnow

TOKEN_PREFIX = "kiln_"
# How stale a token's ``last_used_at`` may be: recording every request would make every poll a
# write (a module constant until settings grow a knob for it).
TOKEN_USE_RESOLUTION = timedelta(minutes=5)

ROLES = ("admin", "user", "viewer")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024  # scrypt on a megabyte "password" is a cheap way to burn a CPU
PASSWORD_METHOD = "scrypt"
# Checked when the email is unknown, so a miss costs as much as a wrong password (no user enumeration by timing).
_DUMMY_HASH = generate_password_hash("kiln-no-such-user", method=PASSWORD_METHOD)


def hash_token(token: str) -> str:
    """The stored form of a token: tokens are 256-bit random, so one sha256 round is enough."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(
    *, session: Session, email: str, role: str | None = None, password: str | None = None, is_admin: bool = False,
) -> tuple[User, str]:
    """Create a user and a first API token; returns the user and the token's plain text.

    ``role`` is admin, user or viewer (``is_admin=True`` is the older spelling of ``role="admin"``);
    without ``password`` the user can use API tokens but cannot sign in to the web pages.
    """
    role = role or ("admin" if is_admin else "user")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise ValueError(f"not an email address: {email!r}")
    if session.execute(select(User.id).where(User.email == email)).first():
        raise Conflict(f"a user with email {email} already exists")
    user = User(email=email, role=role, active=True)
    if password is not None:
        set_password(user, password)
    session.add(user)
    session.flush()
    return user, issue_token(session=session, user=user)


def set_password(user: User, password: str) -> None:
    """Store a scrypt hash of ``password`` on ``user`` (ValueError when too short or too long)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"a password may have at most {MAX_PASSWORD_LENGTH} characters")
    user.password_hash = generate_password_hash(password, method=PASSWORD_METHOD)


def authenticate_password(*, session: Session, email: str, password: str) -> User | None:
    """The active user with this email and password, or None (unknown email, wrong password, disabled)."""
    email = (email or "").strip().lower()
    user = None
    if email and len(email) <= 320:
        user = session.execute(select(User).where(User.email == email)).scalar_one_or_none()
    password = (password or "")[:MAX_PASSWORD_LENGTH]
    stored = user.password_hash if user is not None and user.password_hash else _DUMMY_HASH
    ok = check_password_hash(stored, password)  # always hash: a miss takes as long as a hit
    if user is None or not user.password_hash or not ok or not user.active:
        return None
    return user


def get_active_user(*, session: Session, user_id: int) -> User | None:
    """The user with this id if still active (a signed-in session of a disabled user ends)."""
    user = session.get(User, user_id)
    return user if user is not None and user.active else None


def can_write(user: User) -> bool:
    """Whether ``user`` may change anything (submit, cancel, retry, pause, resume, upload): not a viewer."""
    return user.active and user.role in ("admin", "user")


def issue_token(*, session: Session, user: User, name: str = "default", expires_at: datetime | None = None) -> str:
    """Create a new API token for ``user`` and return its plain text (shown once)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, token_sha256=hash_token(token), prefix=token[:12], name=name,
                         expires_at=expires_at))
    session.flush()
    return token


# Built once (every API request not answered from the cache runs it): a live token and its active owner.
_TOKEN_OWNER = (
    select(ApiToken.id, ApiToken.expires_at, ApiToken.last_used_at,
           User.id, User.email, User.role, User.active, User.created_at)
    .join(User, User.id == ApiToken.user_id)
    .where(ApiToken.token_sha256 == bindparam("sha256"), ApiToken.revoked_at.is_(None), User.active.is_(True))
)


def detached_user(**columns) -> User:
    """A :class:`User` holding ``columns`` as a query would load them (values straight into the
    instance's dict, no attribute events: a third of the constructor's cost), detached: clean, and
    any other column loads once a session adopts it (``Session.merge(load=False)``)."""
    configure_mappers()  # what the constructor would do first; a no-op once configured
    user = _NEW_USER()
    user.__dict__.update(columns)
    make_transient_to_detached(user)
    return user


_NEW_USER = User.__mapper__.class_manager.new_instance


def authenticate(*, bind: Engine, token: str, cache_seconds: float = 0.0) -> tuple[User, token_cache.Entry] | None:
    """The active owner of an unrevoked, unexpired ``token`` (detached) and the token's entry (for
    :func:`record_use`), or None.

    One Core statement on a pooled connection of ``bind`` (no ``Session``, no ORM loading), or none
    while :mod:`app.token_cache` holds the token's entry, for at most ``cache_seconds``: with the
    cache off (the default) every request reads the token's row, so a revocation, an expiry or a
    disabled owner is refused from the next request on.
    """
    if not token or len(token) > 200:
        return None
    digest = hash_token(token)
    entry = token_cache.CACHE.get(digest, cache_seconds) if cache_seconds > 0 else None
    if entry is None:
        generation = token_cache.CACHE.generation
        with bind.connect() as connection:
            row = connection.execute(_TOKEN_OWNER, {"sha256": digest}).first()
        if row is None:
            return None
        entry = token_cache.Entry(
            token_id=row[0], expires_at=row[1], last_used_at=row[2],
            user=dict(id=row[3], email=row[4], role=row[5], active=row[6], created_at=row[7]),
        )
        if cache_seconds > 0:
            token_cache.CACHE.put(digest, entry, generation)
    if entry.expires_at is not None and entry.expires_at <= utcnow():
        return None
    return detached_user(**entry.user), entry


def use_due(entry: token_cache.Entry) -> bool:
    """Whether the token's use is to be recorded now (at most once per ``TOKEN_USE_RESOLUTION``)."""
    return entry.last_used_at is None or utcnow() - entry.last_used_at >= TOKEN_USE_RESOLUTION


def record_use(*, session: Session, entry: token_cache.Entry) -> None:
    """Record the token's use now: a pending UPDATE in ``session`` the caller commits."""
    now = utcnow()
    # Conditional, so concurrent requests of one token record its use once.
    due = now - TOKEN_USE_RESOLUTION
    session.execute(
        update(ApiToken)
        .where(ApiToken.id == entry.token_id, or_(ApiToken.last_used_at.is_(None), ApiToken.last_used_at < due))
        .values(last_used_at=now)
    )
    entry.last_used_at = now


def revoke_tokens(*, session: Session, user: User) -> int:
    """Revoke all of a user's live tokens; returns how many."""
    live = [t for t in user.tokens if t.revoked_at is None]
    for token in live:
        token.revoked_at = utcnow()
    return len(live)


MAX_TOKEN_NAME = 100


def parse_expiry(text: str | None) -> datetime | None:
    """An expiry from a form or JSON: ``YYYY-MM-DD`` (valid through that day, UTC) or ISO datetime; None if blank."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime.combine(day + timedelta(days=1), time(0), tzinfo=timezone.utc)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SpecError.at("expires_at", f"not a date (YYYY-MM-DD) or ISO datetime: {text[:40]!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def list_tokens(*, session: Session, user: User) -> list[ApiToken]:
    """The user's own tokens, newest first (revoked and expired ones too, marked as such)."""
    return list(session.execute(
        select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id.desc())
    ).scalars())


def create_token(
    *, session: Session, user: User, name: str, expires_at: datetime | None = None,
) -> tuple[ApiToken, str]:
    """A new named token for ``user`` (every role: tokens are one's own); returns the row and its plain text."""
    name = (name or "").strip()
    if not name or len(name) > MAX_TOKEN_NAME:
        raise SpecError.at("name", f"a token needs a name of 1 to {MAX_TOKEN_NAME} characters")
    if expires_at is not None and expires_at <= utcnow():
        raise SpecError.at("expires_at", "the expiry must be in the future")
    plain = issue_token(session=session, user=user, name=name, expires_at=expires_at)
    row = session.execute(select(ApiToken).where(ApiToken.token_sha256 == hash_token(plain))).scalar_one()
    return row, plain


def revoke_token(*, session: Session, user: User, token_id: int) -> ApiToken:
    """Revoke one of the user's own tokens (another's answers NotFound); revoking twice is harmless."""
    token = session.execute(
        select(ApiToken).where(ApiToken.id == token_id, ApiToken.user_id == user.id)
    ).scalar_one_or_none()
    if token is None:
        raise NotFound(f"token {token_id} not found")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    return token


def token_status(token: ApiToken) -> str:
    """``active``, ``revoked`` or ``expired``."""
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= utcnow():
        return "expired"
    return "active"


def require_admin(actor: User) -> None:
    """NotFound unless ``actor`` is an active admin: user administration does not exist for anyone else."""
    if not (actor.active and actor.is_admin):
        raise NotFound("not found")


def list_users(*, session: Session, actor: User) -> list[User]:
    """Every user, oldest first (admins only)."""
    require_admin(actor)
    return list(session.execute(select(User).order_by(User.id)).scalars())


def add_user(*, session: Session, actor: User, email: str, role: str, password: str | None) -> tuple[User, str]:
    """An admin creates a user with a role and an initial password; returns the user and a first API token."""
    require_admin(actor)
    if role not in ROLES:
        raise SpecError.at("role", f"must be one of {', '.join(ROLES)}")
    try:
        return create_user(session=session, email=email or "", role=role, password=password or None)
    except ValueError as exc:
        field = "password" if "password" in str(exc) else "email"
        raise SpecError.at(field, str(exc)) from None


def update_user(*, session: Session, actor: User, user_id: int, role: str | None = None,
                active: bool | None = None, password: str | None = None) -> User:
    """An admin sets a user's role, active flag or password.

    Refused (Conflict) when an admin would disable themselves or when no active admin would be left.
    """
    require_admin(actor)
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    if role is not None and role not in ROLES:
        raise SpecError.at("role", f"must be one of {', '.join(ROLES)}")
    if active is False and user.id == actor.id:
        raise Conflict("you cannot disable your own account")
    loses_admin = user.is_admin and user.active and ((role is not None and role != "admin") or active is False)
    if loses_admin:
        # Locks the admin rows on PostgreSQL, so two admins demoting each other cannot both pass the count.
        admins = session.execute(
            select(User.id).where(User.role == "admin", User.active.is_(True)).with_for_update()
        ).all()
        if len(admins) <= 1:
            raise Conflict("this is the last active admin; make another admin first")
    if role is not None:
        user.role = role
    if active is not None:
        user.active = active
    if password:
        try:
            set_password(user, password)
        except ValueError as exc:
            raise SpecError.at("password", str(exc)) from None
    session.flush()
    return user

