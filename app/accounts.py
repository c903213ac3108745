"""Users and API tokens: creation and bearer-token authentication (tokens are stored hashed)."""

from __future__ import annotations

import hashlib
import secrets

from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.jobs.errors import Conflict
from app.models import ApiToken, User, utcnow

TOKEN_PREFIX = "kiln_"
# How stale a token's ``last_used_at`` may be: recording every request would make every poll a
# write (a module constant until settings grow a knob for it).
TOKEN_USE_RESOLUTION = timedelta(minutes=5)


def hash_token(token: str) -> str:
    """The stored form of a token: tokens are 256-bit random, so one sha256 round is enough."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(*, session: Session, email: str, is_admin: bool = False) -> tuple[User, str]:
    """Create a user and a first API token; returns the user and the token's plain text."""
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise ValueError(f"not an email address: {email!r}")
    if session.execute(select(User.id).where(User.email == email)).first():
        raise Conflict(f"a user with email {email} already exists")
    user = User(email=email, is_admin=is_admin)
    session.add(user)
    session.flush()
    return user, issue_token(session=session, user=user)


def issue_token(*, session: Session, user: User, name: str = "default") -> str:
    """Create a new API token for ``user`` and return its plain text (shown once)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, token_sha256=hash_token(token), prefix=token[:12], name=name))
    session.flush()
    return token


def authenticate(*, session: Session, token: str) -> tuple[User, bool] | None:
    """The user owning an unrevoked ``token`` and whether its use was recorded (a pending UPDATE
    the caller commits), or None. Use is recorded at most once per ``TOKEN_USE_RESOLUTION``, so
    a poll normally writes nothing."""
    if not token or len(token) > 200:
        return None
    row = session.execute(
        select(ApiToken.id, ApiToken.last_used_at, User)
        .join(User, User.id == ApiToken.user_id)
        .where(ApiToken.token_sha256 == hash_token(token), ApiToken.revoked_at.is_(None))
    ).one_or_none()
    if row is None:
        return None
    token_id, last_used_at, user = row
    now = utcnow()
    if last_used_at is not None and now - last_used_at < TOKEN_USE_RESOLUTION:
        return user, False
    # Conditional, so concurrent requests of one token record its use once.
    due = now - TOKEN_USE_RESOLUTION
    session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id, or_(ApiToken.last_used_at.is_(None), ApiToken.last_used_at < due))
        .values(last_used_at=now)
    )
    return user, True


def revoke_tokens(*, session: Session, user: User) -> int:
    """Revoke all of a user's live tokens; returns how many."""
    live = [t for t in user.tokens if t.revoked_at is None]
    for token in live:
        token.revoked_at = utcnow()
    return len(live)
