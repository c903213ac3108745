"""Model versions (trained models registered for prediction) and the aliases that name them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, String, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, UTCDateTime, utcnow


class ModelVersion(Base):
    """A trained model: which checkpoint serves it, and the shape of its inputs and outputs."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("owner_id", "name", "version", name="uq_model_versions_owner_name_version"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column()
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id", ondelete="RESTRICT"))
    arch: Mapped[str] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(32))
    # What a prediction must send (``input_shape``) and gets back (classes, target names).
    signature: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # What a prediction must send, checked at submit (app.model_registry.input_schema); NULL on
    # versions registered before it was stored, whose schema is derived from the signature.
    input_schema: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Where the version came from: base model (fine-tunes), dataset and its sha256, training spec.
    lineage: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Deleted versions keep their row (and number, which is never reused) so a job's history still
    # names them; nothing resolves to them any more.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Micro-batch limits of this version's predictions (NULL: the global KILN_PREDICT_* setting).
    max_batch_size: Mapped[int | None] = mapped_column(nullable=True)
    max_delay_ms: Mapped[int | None] = mapped_column(nullable=True)


class ModelAlias(Base):
    """A movable name (``production``, ``staging``, ...) for one version of one owner's model."""

    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("owner_id", "name", "alias", name="uq_model_aliases_owner_name_alias"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    alias: Mapped[str] = mapped_column(String(100))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # Micro-batch limits of predictions that name this alias (NULL: the version's, else the global).
    max_batch_size: Mapped[int | None] = mapped_column(nullable=True)
    max_delay_ms: Mapped[int | None] = mapped_column(nullable=True)
    # Prediction workers load the version this alias names when they start.
    warm: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
