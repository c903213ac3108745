"""Users (role, password hash, active flag) and their API tokens (only a token's sha256 is stored)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, String, Text
from sqlalchemy import true as sa_true
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.models.base import Base, UTCDateTime, utcnow


class User(Base):
    """A person or service account that owns jobs, datasets and models."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    # admin sees and controls everything; user owns their own work; viewer only reads their own.
    role: Mapped[str] = mapped_column(String(16), default="user", server_default="user")
    # None: the user signs in with API tokens only (no web password set).
    password_hash: Mapped[str | None] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=sa_true())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The key that signs this user's webhooks, encrypted under a key derived from KILN_SECRET_KEY
    # (the worker must read it back to sign; see app/webhooks.py). NULL: none created yet.
    webhook_secret: Mapped[str | None] = mapped_column(Text)
    webhook_secret_prefix: Mapped[str | None] = mapped_column(String(16))
    webhook_secret_created_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    tokens: Mapped[list["ApiToken"]] = relationship(back_populates="user")

    @property
    def is_admin(self) -> bool:
        """True for the ``admin`` role (kept for the services that scope queries by owner)."""
        return self.role == "admin"


class ApiToken(Base):
    """A bearer token; the plain text is shown once at creation and never stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(100), default="default")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # None: the token never expires; from this instant it answers 401 like a revoked one.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship(back_populates="tokens")
