"""Trained model versions grouped by name, for the models page (the API's ``GET /models`` lists the same rows)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ModelVersion, User

MAX_VERSIONS = 1000


@dataclass
class ModelName:
    """One owner's model name and its versions, newest first."""

    owner_id: int
    owner_email: str
    name: str
    versions: list[ModelVersion] = field(default_factory=list)

    @property
    def latest(self) -> ModelVersion:
        """The newest version."""
        return self.versions[0]


def versions_by_name(*, session: Session, user: User) -> list[ModelName]:
    """The user's model versions (every user's for admins) grouped by owner and name, names A to Z."""
    stmt = (select(ModelVersion, User.email).join(User, User.id == ModelVersion.owner_id)
            .order_by(ModelVersion.name, ModelVersion.owner_id, ModelVersion.version.desc()).limit(MAX_VERSIONS))
    if not user.is_admin:
        stmt = stmt.where(ModelVersion.owner_id == user.id)
    groups: dict[tuple[int, str], ModelName] = {}
    for version, email in session.execute(stmt):
        key = (version.owner_id, version.name)
        groups.setdefault(key, ModelName(version.owner_id, email, version.name)).versions.append(version)
    return list(groups.values())


def reference(version: ModelVersion, user: User) -> str:
    """How ``user`` names this version in a prediction spec: ``name@N``, with ``owner/`` for another user's."""
    prefix = "" if version.owner_id == user.id else f"{version.owner_id}/"
    return f"{prefix}{version.name}@{version.version}"
