"""The model registry: versions grouped by name, aliases, lineage, input schemas and deletion.

A version is ``name@N`` (numbers are never reused, a deleted version keeps its row); an alias
(``production``, ``staging``, ...) names one live version of the same owner's model and moves
when set again; ``latest`` is automatic. The API (app/web/api_models.py), the CLI and the models
page call these services; ``app.jobs.service.resolve_model`` resolves ``name@alias`` with them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app import images, task_rules
from app.jobs import states
from app.jobs.errors import Conflict, NotFound, SpecError
from app.jobs.schemas import AliasServing, ServingSettings
from app.models import Checkpoint, Dataset, Job, ModelAlias, ModelVersion, User, utcnow

# An alias looks like a model name, but is neither ``latest`` nor a number (those name versions).
ALIAS_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
RESERVED_ALIASES = ("latest",)

MAX_VERSIONS = 1000


@dataclass
class ModelName:
    """One owner's model name and its versions, newest first."""

    owner_id: int
    owner_email: str
    name: str
    versions: list[ModelVersion] = field(default_factory=list)
    aliases: dict[int, list[str]] = field(default_factory=dict)  # version id -> its aliases
    warm: set[str] = field(default_factory=set)  # the aliases prediction workers load at start

    @property
    def latest(self) -> ModelVersion:
        """The newest version."""
        return self.versions[0]


def versions_by_name(*, session: Session, user: User) -> list[ModelName]:
    """The user's model versions (every user's for admins) grouped by owner and name, names A to Z."""
    stmt = (select(ModelVersion, User.email).join(User, User.id == ModelVersion.owner_id)
            .order_by(ModelVersion.name, ModelVersion.owner_id, ModelVersion.version.desc()).limit(MAX_VERSIONS))
    stmt = stmt.where(ModelVersion.deleted_at.is_(None))
    if not user.is_admin:
        stmt = stmt.where(ModelVersion.owner_id == user.id)
    groups: dict[tuple[int, str], ModelName] = {}
    for version, email in session.execute(stmt):
        key = (version.owner_id, version.name)
        groups.setdefault(key, ModelName(version.owner_id, email, version.name)).versions.append(version)
    by_version = {v.id: group for group in groups.values() for v in group.versions}
    if by_version:
        rows = session.execute(select(ModelAlias.model_version_id, ModelAlias.alias, ModelAlias.warm)
                               .where(ModelAlias.model_version_id.in_(list(by_version))).order_by(ModelAlias.alias))
        for version_id, alias, warm in rows:
            by_version[version_id].aliases.setdefault(version_id, []).append(alias)
            if warm:
                by_version[version_id].warm.add(alias)
    return list(groups.values())


def reference(version: ModelVersion, user: User) -> str:
    """How ``user`` names this version in a prediction spec: ``name@N``, with ``owner/`` for another user's."""
    prefix = "" if version.owner_id == user.id else f"{version.owner_id}/"
    return f"{prefix}{version.name}@{version.version}"


# --- input schema ---------------------------------------------------------------------------


def input_schema(signature: dict[str, Any]) -> dict[str, Any]:
    """What a prediction must send to a model with this signature (stored on its version at registration)."""
    if signature.get("input_kind") == "image":
        return {"kind": "image", "shape": [int(n) for n in signature.get("image_shape") or signature["input_shape"]]}
    if signature.get("input_kind") == "pretrained_tokens":  # truncated to the model's max_length
        return {"kind": "pretrained_text", "max_length": int(signature.get("max_length") or 0)}
    if signature.get("input_kind") == "tfidf":  # any length: a text is counted into its n-grams
        return {"kind": "text", "tokenizer": "tfidf", "vocab_size": int(signature.get("vocab_size") or 0)}
    if signature.get("input_kind") == "tokens":
        schema = {"kind": "text", "max_tokens": int(signature.get("max_tokens") or signature["input_shape"][0]),
                  "vocab_size": int(signature.get("vocab_size") or 0)}
        if signature.get("tokenizer") == "bpe":  # subwords are not counted at submit; the model truncates
            schema["tokenizer"] = "bpe"
        return schema
    shape = [int(n) for n in signature.get("input_shape") or []]
    return {"kind": "numbers", "shape": shape, "width": math.prod(shape),
            "features": signature.get("feature_names")}


def schema_of(version: ModelVersion) -> dict[str, Any]:
    """The version's stored input schema (derived from its signature for versions older than the column)."""
    return version.input_schema or input_schema(version.signature)


def _number_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = {list: "a list", dict: "an object"}.get(type(value)) or json.dumps(value)
        return f"expected a number, got {shown}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {value}"
    return None


def check_inputs(*, schema: dict[str, Any], inputs: list, ref: str) -> None:
    """Check prediction inputs against an input schema; a SpecError names the first bad row and field."""
    if schema["kind"] == "image":
        for i, row in enumerate(inputs):
            if not isinstance(row, str):
                raise SpecError.at(f"inputs[{i}]", f"model {ref} classifies images: expected a base64 PNG or JPEG string")
            try:
                images.decode_input(row, f"inputs[{i}]")
            except images.ImageError as exc:
                raise SpecError.at(f"inputs[{i}]", str(exc)) from None
        return
    if schema["kind"] == "pretrained_text":
        for i, row in enumerate(inputs):
            if not isinstance(row, str):
                raise SpecError.at(f"inputs[{i}]", f"model {ref} reads text: expected a string")
        return
    if schema["kind"] == "text":
        limit = schema.get("max_tokens")
        for i, row in enumerate(inputs):
            if not isinstance(row, str):
                raise SpecError.at(f"inputs[{i}]", f"model {ref} classifies text: expected a string")
            if schema.get("tokenizer", "word") != "word":
                continue
            count = len(task_rules.words(row))
            if count > limit:
                raise SpecError.at(f"inputs[{i}]", f"has {count} words; model {ref} reads at most {limit}")
        return
    shape, width = schema["shape"], schema["width"]
    for i, row in enumerate(inputs):
        if not isinstance(row, list):
            raise SpecError.at(f"inputs[{i}]", f"expected a list of {width} numbers, got a string")
        count = 0
        for j, value in enumerate(row):
            # A row is flat, or nested one level (steps of features); each value must be a number.
            parts = value if isinstance(value, list) and len(shape) > 1 else [value]
            for k, part in enumerate(parts):
                problem = _number_problem(part)
                if problem:
                    where = f"inputs[{i}][{j}]" + (f"[{k}]" if parts is value else "")
                    raise SpecError.at(where, problem)
            if parts is value and len(value) != shape[-1]:
                raise SpecError.at(f"inputs[{i}][{j}]", f"has {len(value)} values; a step of model {ref} has {shape[-1]}")
            count += len(parts)
        if count != width:
            raise SpecError.at(f"inputs[{i}]", f"has {count} values; model {ref} expects {width} (shape {shape})")


# --- lineage --------------------------------------------------------------------------------


def lineage(*, session: Session, job: Job) -> dict[str, Any]:
    """Where a training job's model comes from: its base version (fine-tunes), dataset and sha256, spec."""
    dataset_id = job.spec.get("dataset", {}).get("id", "")
    record: dict[str, Any] = {"job_id": job.id, "spec": job.spec, "dataset": {"id": dataset_id, "sha256": None}}
    if dataset_id.startswith("dataset:"):
        record["dataset"]["sha256"] = session.execute(
            select(Dataset.sha256).where(Dataset.id == int(dataset_id.split(":", 1)[1]))).scalar_one_or_none()
    base = session.get(ModelVersion, job.init_model_version_id) if job.init_model_version_id else None
    if base is not None:
        digest = session.execute(select(Checkpoint.sha256).where(Checkpoint.id == base.checkpoint_id)).scalar_one()
        record["base"] = {"id": base.id, "ref": f"{base.name}@{base.version}", "checkpoint_sha256": digest}
    return record


# --- aliases and deletion -------------------------------------------------------------------


def _live_versions(session: Session, owner: User, name: str):
    return select(ModelVersion).where(ModelVersion.owner_id == owner.id, ModelVersion.name == name,
                                      ModelVersion.deleted_at.is_(None))


def describe(*, session: Session, owner: User, name: str) -> tuple[list[ModelVersion], dict[str, ModelVersion]]:
    """A model's live versions (newest first) and its aliases (``latest`` included); NotFound if it has none."""
    versions = list(session.execute(_live_versions(session, owner, name).order_by(ModelVersion.version.desc())).scalars())
    if not versions:
        raise NotFound(f"no model {name!r}")
    by_id = {v.id: v for v in versions}
    aliases = {"latest": versions[0]}
    for alias in session.execute(select(ModelAlias).where(ModelAlias.owner_id == owner.id, ModelAlias.name == name)
                                 .order_by(ModelAlias.alias)).scalars():
        if alias.model_version_id in by_id:
            aliases[alias.alias] = by_id[alias.model_version_id]
    return versions, aliases


def version(*, session: Session, owner: User, name: str, number: int) -> ModelVersion:
    """One live version; NotFound if it does not exist or was deleted."""
    found = session.execute(_live_versions(session, owner, name).where(ModelVersion.version == number)).scalar_one_or_none()
    if found is None:
        raise NotFound(f"no version {name}@{number}")
    return found


def check_alias(alias: str, field: str = "alias") -> str:
    """``alias`` if it may name a version: the Name pattern, not ``latest``, not a number."""
    if not ALIAS_PATTERN.match(alias) or alias in RESERVED_ALIASES or alias.isdecimal():
        raise SpecError.at(field, f"{alias!r} cannot be an alias: use letters, digits, '_', '.', '-' "
                                  "(not 'latest', which is automatic, and not a number, which names a version)")
    return alias


def set_alias(*, session: Session, owner: User, name: str, alias: str, number: int,
              serving: AliasServing | None = None) -> ModelAlias:
    """Point ``name@alias`` at version ``number`` (creating the alias or moving it).

    With ``serving`` the alias's serving settings are replaced; without, a moved alias keeps its own.
    """
    check_alias(alias)
    target = version(session=session, owner=owner, name=name, number=number)
    row = session.execute(select(ModelAlias).where(ModelAlias.owner_id == owner.id, ModelAlias.name == name,
                                                   ModelAlias.alias == alias)).scalar_one_or_none()
    if row is None:
        row = ModelAlias(owner_id=owner.id, name=name, alias=alias, model_version_id=target.id, warm=False)
        session.add(row)
    else:
        row.model_version_id = target.id
    if serving is not None:
        row.max_batch_size, row.max_delay_ms, row.warm = serving.max_batch_size, serving.max_delay_ms, serving.warm
    session.flush()
    return row


def aliases_of(*, session: Session, owner: User, name: str) -> list[ModelAlias]:
    """The stored aliases of one of ``owner``'s models (``latest`` is not stored), A to Z."""
    return list(session.execute(select(ModelAlias).where(ModelAlias.owner_id == owner.id, ModelAlias.name == name)
                                .order_by(ModelAlias.alias)).scalars())


def set_serving(*, session: Session, owner: User, name: str, number: int, serving: ServingSettings) -> ModelVersion:
    """Replace the micro-batch limits of version ``number`` (null fields: the global settings)."""
    target = version(session=session, owner=owner, name=name, number=number)
    target.max_batch_size, target.max_delay_ms = serving.max_batch_size, serving.max_delay_ms
    session.flush()
    return target


def alias_in(ref: str) -> str | None:
    """The alias a model reference names (``name@production`` -> ``production``), else None."""
    label = ref.rpartition("/")[2].partition("@")[2]
    return None if not label or label == "latest" or label.isdecimal() else label


def batch_limits(*, session: Session, model: ModelVersion, ref: str) -> tuple[int | None, int | None]:
    """``(max_batch_size, max_delay_ms)`` for a prediction of ``model`` named by ``ref``: the alias's
    (when ``ref`` names one that still points at ``model``), else the version's; None where neither says."""
    size, delay = model.max_batch_size, model.max_delay_ms
    label = alias_in(ref)
    if label is not None:
        row = session.execute(select(ModelAlias.max_batch_size, ModelAlias.max_delay_ms).where(
            ModelAlias.owner_id == model.owner_id, ModelAlias.name == model.name, ModelAlias.alias == label,
            ModelAlias.model_version_id == model.id)).one_or_none()
        if row is not None:
            size = row.max_batch_size if row.max_batch_size is not None else size
            delay = row.max_delay_ms if row.max_delay_ms is not None else delay
    return size, delay


def warm_versions(*, session: Session) -> list[tuple[str, str, str]]:
    """What prediction workers load at start: ``(ref, checkpoint path, sha256)`` of each live version
    a warm alias names (every owner's), one entry per version, most recently set alias first."""
    rows = session.execute(
        select(ModelVersion.id, ModelVersion.name, ModelVersion.version, Checkpoint.path, Checkpoint.sha256)
        .join(ModelAlias, ModelAlias.model_version_id == ModelVersion.id)
        .join(Checkpoint, Checkpoint.id == ModelVersion.checkpoint_id)
        .where(ModelAlias.warm.is_(True), ModelVersion.deleted_at.is_(None))
        .order_by(ModelAlias.updated_at.desc(), ModelAlias.id.desc())
    ).all()
    seen: dict[int, tuple[str, str, str]] = {}
    for row in rows:
        seen.setdefault(row.id, (f"{row.name}@{row.version}", row.path, row.sha256))
    return list(seen.values())


def remove_alias(*, session: Session, owner: User, name: str, alias: str) -> None:
    """Remove an alias; NotFound if the model has no such alias."""
    row = session.execute(select(ModelAlias).where(ModelAlias.owner_id == owner.id, ModelAlias.name == name,
                                                   ModelAlias.alias == alias)).scalar_one_or_none()
    if row is None:
        raise NotFound(f"model {name!r} has no alias {alias!r}")
    session.delete(row)
    session.flush()


def resolve_alias(*, session: Session, owner: User, name: str, alias: str) -> ModelVersion | None:
    """The live version ``name@alias`` names, or None."""
    return session.execute(
        select(ModelVersion).join(ModelAlias, ModelAlias.model_version_id == ModelVersion.id)
        .where(ModelAlias.owner_id == owner.id, ModelAlias.name == name, ModelAlias.alias == alias,
               ModelVersion.deleted_at.is_(None))
    ).scalar_one_or_none()


def checkpoint_digest(*, session: Session, model: ModelVersion) -> str:
    """The sha256 of the checkpoint a version serves (what prediction workers cache it under)."""
    return session.execute(select(Checkpoint.sha256).where(Checkpoint.id == model.checkpoint_id)).scalar_one()


def deleted_digests(*, session: Session, digests: list[str]) -> list[str]:
    """Those of ``digests`` that only deleted versions serve (a worker's cache may drop them)."""
    if not digests:
        return []
    rows = session.execute(select(Checkpoint.sha256, ModelVersion.deleted_at)
                           .join(ModelVersion, ModelVersion.checkpoint_id == Checkpoint.id)
                           .where(Checkpoint.sha256.in_(digests))).all()
    live = {digest for digest, deleted_at in rows if deleted_at is None}
    return sorted({digest for digest, deleted_at in rows if deleted_at is not None} - live)


def delete_version(*, session: Session, owner: User, name: str, number: int) -> ModelVersion:
    """Delete a version: refused (Conflict) while an alias points at it or a queued or running job uses it."""
    target = version(session=session, owner=owner, name=name, number=number)
    aliases = list(session.execute(select(ModelAlias.alias).where(ModelAlias.model_version_id == target.id)).scalars())
    if aliases:
        raise Conflict(f"{name}@{number} is what alias {', '.join(aliases)} names; move or remove the alias first")
    users = list(session.execute(
        select(Job.id).where(or_(Job.model_version_id == target.id, Job.init_model_version_id == target.id),
                             Job.state.in_((states.QUEUED, states.RUNNING)), Job.id != target.job_id).limit(5)
    ).scalars())
    if users:
        raise Conflict(f"{name}@{number} is used by queued or running job(s) {', '.join(map(str, users))}; "
                       "wait for them or cancel them first")
    target.deleted_at = utcnow()
    session.flush()
    return target
